//! What a round does to the pipeline: the kinds of fault, and a round's
//! schedule of them drawn from the campaign's seed.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// A process of the pipeline a fault can hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Part {
    Gateway,
    ShopWorker,
    OrderWorker,
    Payment,
    Broker,
    Redis,
    Dynamodb,
}

impl Part {
    pub fn name(self) -> &'static str {
        match self {
            Self::Gateway => "gateway",
            Self::ShopWorker => "shop-worker",
            Self::OrderWorker => "order-worker",
            Self::Payment => "payment",
            Self::Broker => "broker",
            Self::Redis => "redis",
            Self::Dynamodb => "dynamodb",
        }
    }

    const SERVICES: [Part; 4] = [
        Self::Gateway,
        Self::ShopWorker,
        Self::OrderWorker,
        Self::Payment,
    ];
    const STORES: [Part; 3] = [Self::Broker, Self::Redis, Self::Dynamodb];
    const WORKERS: [Part; 2] = [Self::ShopWorker, Self::OrderWorker];
    /// What the services reach over the network through a fault proxy.
    const LINKS: [Part; 4] = [Self::Redis, Self::Broker, Self::Dynamodb, Self::Payment];
}

/// What happens on a link while a network fault lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Net {
    /// Every byte delayed, both ways.
    Slow,
    /// Open connections closed, new ones closed as soon as accepted.
    Cut,
    /// Bytes taken and held, connections left open.
    Blackhole,
}

impl Net {
    const ALL: [Net; 3] = [Self::Slow, Self::Cut, Self::Blackhole];

    fn name(self) -> &'static str {
        match self {
            Self::Slow => "slow",
            Self::Cut => "cut",
            Self::Blackhole => "blackhole",
        }
    }
}

/// How the payment service misbehaves, through its behaviour endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PaymentTrouble {
    /// Every call answered 503.
    Outage,
    /// A share of charges made, but answered only after the caller gave up.
    Timeouts,
    /// Every call answered late.
    Slow,
}

impl PaymentTrouble {
    const ALL: [PaymentTrouble; 3] = [Self::Outage, Self::Timeouts, Self::Slow];

    fn name(self) -> &'static str {
        match self {
            Self::Outage => "outage",
            Self::Timeouts => "timeouts",
            Self::Slow => "slow",
        }
    }
}

/// A kind of fault, as `--faults` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum FaultKind {
    /// SIGKILL, then a restart at once or after a delay.
    Kill(Part),
    /// SIGSTOP for longer than the consumer group's session, then SIGCONT:
    /// it wakes up after its partitions were given to another member.
    Pause(Part),
    /// A network fault between every service and one store (or the
    /// payment service).
    Net(Net, Part),
    /// One worker restarted with its clock a few seconds off, and back.
    Skew(Part),
    Payment(PaymentTrouble),
}

impl FaultKind {
    /// Every kind, in the order the report lists them.
    pub fn all() -> Vec<FaultKind> {
        let mut all: Vec<FaultKind> = Part::SERVICES
            .iter()
            .chain(Part::STORES.iter())
            .map(|p| Self::Kill(*p))
            .collect();
        all.extend(Part::WORKERS.iter().map(|p| Self::Pause(*p)));
        for link in Part::LINKS {
            all.extend(Net::ALL.iter().map(|n| Self::Net(*n, link)));
        }
        all.extend(Part::WORKERS.iter().map(|p| Self::Skew(*p)));
        all.extend(PaymentTrouble::ALL.iter().map(|t| Self::Payment(*t)));
        all
    }

    /// Whether the fault needs a second member of the worker's group (the
    /// one the paused worker's partitions go to).
    pub fn is_pause(self) -> bool {
        matches!(self, Self::Pause(_))
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Kill(p) => write!(f, "kill-{}", p.name()),
            Self::Pause(p) => write!(f, "pause-{}", p.name()),
            Self::Net(n, p) => write!(f, "{}-{}", n.name(), p.name()),
            Self::Skew(p) => write!(f, "skew-{}", p.name()),
            Self::Payment(t) => write!(f, "payment-{}", t.name()),
        }
    }
}

impl From<FaultKind> for String {
    fn from(kind: FaultKind) -> Self {
        kind.to_string()
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("unknown fault {0:?}; the kinds are: {known}", known = known_kinds())]
pub struct UnknownFault(String);

fn known_kinds() -> String {
    FaultKind::all()
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl FromStr for FaultKind {
    type Err = UnknownFault;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let raw = raw.trim();
        Self::all()
            .into_iter()
            .find(|kind| kind.to_string() == raw)
            .ok_or_else(|| UnknownFault(raw.to_owned()))
    }
}

impl TryFrom<String> for FaultKind {
    type Error = UnknownFault;

    fn try_from(raw: String) -> Result<Self, Self::Error> {
        raw.parse()
    }
}

/// `--faults`: a comma-separated list of kinds, or `all`.
pub fn parse_list(raw: &str) -> Result<Vec<FaultKind>, UnknownFault> {
    if raw.trim() == "all" {
        return Ok(FaultKind::all());
    }
    raw.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(str::parse)
        .collect()
}

/// One fault of a round: when it starts (from the crowd's first buyer),
/// how long it lasts, and its size.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Planned {
    pub kind: FaultKind,
    #[serde(with = "crate::durations::millis")]
    pub at: Duration,
    /// Until the heal: the restart of a killed process (zero: at once),
    /// the SIGCONT of a paused one, the link or payment service healed, the
    /// skewed worker restarted on the true clock.
    #[serde(with = "crate::durations::millis")]
    pub lasts: Duration,
    /// The added delay each way (slow links), or the clock's offset in
    /// seconds (skew, signed), or the share of charges timed out.
    pub size: f64,
}

impl Planned {
    pub fn ends_at(&self) -> Duration {
        self.at + self.lasts
    }

    pub fn describe(&self) -> String {
        let size = match self.kind {
            FaultKind::Net(Net::Slow, _) => format!(", +{:.0} ms each way", self.size),
            FaultKind::Skew(_) => format!(", clock {:+.0} s", self.size),
            FaultKind::Payment(PaymentTrouble::Timeouts) => {
                format!(", {:.0}% of charges", self.size * 100.0)
            }
            FaultKind::Payment(PaymentTrouble::Slow) => format!(", {:.0} ms", self.size),
            _ => String::new(),
        };
        format!(
            "{} at {:.1}s for {:.1}s{size}",
            self.kind,
            self.at.as_secs_f64(),
            self.lasts.as_secs_f64()
        )
    }
}

/// How long the consumer group keeps a silent member: a pause must last
/// longer for its partitions to be given away.
const SESSION: Duration = flashsale_core::bus::consumer::SESSION_TIMEOUT;

/// Draws one fault of `kind` starting within the first `window` of a
/// round's crowd.
pub fn draw(rng: &mut Rng, kind: FaultKind, window: Duration) -> Planned {
    let window_ms = window.as_millis().max(1) as u64;
    let at = Duration::from_millis(rng.between(window_ms / 10, window_ms * 7 / 10));
    let short = Duration::from_millis(rng.between(2_000, 6_000));
    let (lasts, size) = match kind {
        // Half the kills restart at once, half after a few seconds down.
        FaultKind::Kill(_) => (
            if rng.unit() < 0.5 {
                Duration::ZERO
            } else {
                short
            },
            0.0,
        ),
        FaultKind::Pause(_) => (
            SESSION + Duration::from_millis(rng.between(2_000, 6_000)),
            0.0,
        ),
        FaultKind::Net(Net::Slow, _) => (short, rng.between(100, 800) as f64),
        FaultKind::Net(_, _) => (short, 0.0),
        FaultKind::Skew(_) => {
            let seconds = rng.between(2, 8) as f64;
            (short * 2, if rng.unit() < 0.5 { -seconds } else { seconds })
        }
        FaultKind::Payment(PaymentTrouble::Timeouts) => (short, 0.2 + 0.3 * rng.unit()),
        FaultKind::Payment(PaymentTrouble::Slow) => (short, rng.between(500, 3_000) as f64),
        FaultKind::Payment(PaymentTrouble::Outage) => (short, 0.0),
    };
    Planned {
        kind,
        at,
        lasts,
        size,
    }
}

/// The faults of round `round` (from 0): with `one_each`, the round's own
/// kind of `kinds` in turn (so N rounds cover every kind when N is at least
/// their count); else one to `max_per_round` kinds drawn at random, never
/// the same part twice (two faults on one process would heal each other).
pub fn schedule(
    seed: u64,
    round: u64,
    kinds: &[FaultKind],
    max_per_round: usize,
    one_each: bool,
    window: Duration,
) -> Vec<Planned> {
    let mut rng = Rng::for_stream(seed, round);
    if kinds.is_empty() {
        return Vec::new();
    }
    let chosen: Vec<FaultKind> = if one_each {
        vec![kinds[(round % kinds.len() as u64) as usize]]
    } else {
        let count = rng.between(1, max_per_round.max(1) as u64) as usize;
        let mut chosen: Vec<FaultKind> = Vec::new();
        for _ in 0..count * 4 {
            let kind = *rng.pick(kinds);
            if chosen.len() < count && chosen.iter().all(|c| part_of(*c) != part_of(kind)) {
                chosen.push(kind);
            }
        }
        chosen
    };
    let mut planned: Vec<Planned> = chosen
        .into_iter()
        .map(|k| draw(&mut rng, k, window))
        .collect();
    planned.sort_by_key(|p| p.at);
    planned
}

/// The process or link a fault acts on.
fn part_of(kind: FaultKind) -> Option<Part> {
    match kind {
        FaultKind::Kill(p) | FaultKind::Pause(p) | FaultKind::Skew(p) | FaultKind::Net(_, p) => {
            Some(p)
        }
        FaultKind::Payment(_) => Some(Part::Payment),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_reads_back_from_its_name() {
        let all = FaultKind::all();
        assert_eq!(all.len(), 26);
        for kind in all {
            assert_eq!(kind.to_string().parse::<FaultKind>(), Ok(kind));
        }
        assert_eq!(
            parse_list("kill-gateway, pause-order-worker").unwrap(),
            vec![
                FaultKind::Kill(Part::Gateway),
                FaultKind::Pause(Part::OrderWorker)
            ]
        );
        let unknown = parse_list("kill-gateway,kill-everything").unwrap_err();
        assert!(unknown.to_string().contains("kill-everything"), "{unknown}");
        assert!(unknown.to_string().contains("cut-redis"), "{unknown}");
    }

    #[test]
    fn a_seed_replays_the_same_schedule() {
        let kinds = FaultKind::all();
        let window = Duration::from_secs(8);
        for round in 0..20 {
            let a = schedule(42, round, &kinds, 3, false, window);
            assert_eq!(a, schedule(42, round, &kinds, 3, false, window));
            assert!((1..=3).contains(&a.len()), "{a:?}");
            for p in &a {
                assert!(p.at < window, "{p:?}");
            }
        }
        let differs = (0..20).any(|round| {
            schedule(42, round, &kinds, 3, false, window)
                != schedule(43, round, &kinds, 3, false, window)
        });
        assert!(differs);
    }

    #[test]
    fn one_each_covers_every_kind_in_turn() {
        let kinds = FaultKind::all();
        let seen: Vec<FaultKind> = (0..kinds.len() as u64)
            .map(|round| schedule(1, round, &kinds, 1, true, Duration::from_secs(5))[0].kind)
            .collect();
        assert_eq!(seen, kinds);
    }

    #[test]
    fn a_pause_outlasts_the_group_session() {
        let mut rng = Rng::new(3);
        for _ in 0..50 {
            let p = draw(
                &mut rng,
                FaultKind::Pause(Part::ShopWorker),
                Duration::from_secs(5),
            );
            assert!(p.lasts > SESSION, "{p:?}");
        }
    }

    #[test]
    fn a_round_never_hits_one_part_twice() {
        let kinds = FaultKind::all();
        for round in 0..200 {
            let planned = schedule(9, round, &kinds, 3, false, Duration::from_secs(5));
            let mut parts: Vec<_> = planned.iter().map(|p| part_of(p.kind)).collect();
            parts.sort();
            parts.dedup();
            assert_eq!(parts.len(), planned.len(), "{planned:?}");
        }
    }
}
