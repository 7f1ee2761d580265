//! When each buyer of a surge arrives: all at once, at a constant rate, or
//! along stages as k6's ramping-arrival-rate has them
//! (`0:2000/s,5s:50000/s,30s:0/s`): the rate moves in a straight line from
//! one stage to the next, and a stage at the same instant as the one
//! before it is a step (a spike: `10s:100/s,10s:20000/s,12s:20000/s,12s:100/s`).
//!
//! Buyer *i* arrives when the integral of the rate reaches *i*: an open
//! model, whatever happened to the buyers before.

use std::time::Duration;

use flashsale_core::arrival_trace::TraceLine;

#[derive(Debug, Clone, PartialEq)]
pub enum Arrival {
    /// Every buyer at the same instant.
    Burst,
    /// Buyers arrive evenly at this many per second.
    Rate(f64),
    /// Buyers arrive along the rate these stages draw.
    Stages(Stages),
    /// A recorded crowd sent again: each arrival of the trace, its sku,
    /// buyer and quantity, at its offset divided by `speed`.
    Replay(Replay),
}

/// A trace the gateway recorded (`arrival_trace`), and how much faster
/// than recorded to send it (2.0: twice as fast).
#[derive(Debug, Clone, PartialEq)]
pub struct Replay {
    pub lines: Vec<TraceLine>,
    pub speed: f64,
}

/// The rate (buyers per second) at points in time, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Stages(Vec<(Duration, f64)>);

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StagesError {
    #[error("stage {0:?} is not `<time>:<rate>/s` (time as 5s, 500ms or 1.5; rate 0 or more)")]
    Stage(String),
    #[error("stage {0:?} is earlier than the one before it")]
    Backwards(String),
    #[error("stages need at least two points, the first at 0 (as in 0:100/s,10s:100/s)")]
    TooFew,
    #[error("the stages bring no buyer: every rate is 0")]
    Empty,
}

impl Stages {
    pub fn parse(raw: &str) -> Result<Self, StagesError> {
        let mut points: Vec<(Duration, f64)> = Vec::new();
        for stage in raw
            .split([',', '\n'])
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let bad = || StagesError::Stage(stage.to_owned());
            let (at, rate) = stage.split_once(':').ok_or_else(bad)?;
            let at = time(at).ok_or_else(bad)?;
            let rate = rate
                .trim()
                .trim_end_matches("/s")
                .parse::<f64>()
                .ok()
                .filter(|r| r.is_finite() && *r >= 0.0)
                .ok_or_else(bad)?;
            if points.last().is_some_and(|(before, _)| at < *before) {
                return Err(StagesError::Backwards(stage.to_owned()));
            }
            points.push((at, rate));
        }
        if points.len() < 2 || points[0].0 != Duration::ZERO {
            return Err(StagesError::TooFew);
        }
        let stages = Self(points);
        if stages.total() < 1.0 {
            return Err(StagesError::Empty);
        }
        Ok(stages)
    }

    /// How many buyers the stages bring: the integral of the rate.
    pub fn total(&self) -> f64 {
        self.0
            .windows(2)
            .map(|w| (w[1].0 - w[0].0).as_secs_f64() * (w[0].1 + w[1].1) / 2.0)
            .sum()
    }

    /// When each buyer arrives, at most `cap` of them.
    pub fn arrivals(&self, cap: u64) -> Vec<Duration> {
        let total = (self.total().floor() as u64).min(cap);
        let mut out = Vec::with_capacity(total as usize);
        let mut before = 0.0;
        let mut segments = self.0.windows(2).peekable();
        for i in 0..total {
            let target = i as f64;
            while let Some(w) = segments.peek() {
                let ((t0, r0), (t1, r1)) = (w[0], w[1]);
                let span = (t1 - t0).as_secs_f64();
                let here = span * (r0 + r1) / 2.0;
                if before + here > target || segments.len() == 1 {
                    // Solve before + r0 x + (r1 - r0) x^2 / (2 span) = target.
                    let need = target - before;
                    let slope = if span > 0.0 { (r1 - r0) / span } else { 0.0 };
                    let x = if slope.abs() < 1e-12 {
                        if r0 > 0.0 { need / r0 } else { 0.0 }
                    } else {
                        let disc = (r0 * r0 + 2.0 * slope * need).max(0.0);
                        (-r0 + disc.sqrt()) / slope
                    };
                    out.push(t0 + Duration::from_secs_f64(x.clamp(0.0, span)));
                    break;
                }
                before += here;
                segments.next();
            }
        }
        out
    }
}

impl Arrival {
    /// When each of `buyers` arrives (for stages, at most as many as the
    /// stages bring).
    pub fn offsets(&self, buyers: u64) -> Vec<Duration> {
        match self {
            Self::Burst => vec![Duration::ZERO; buyers as usize],
            Self::Rate(rate) => (0..buyers)
                .map(|i| Duration::from_secs_f64(i as f64 / rate))
                .collect(),
            Self::Stages(stages) => stages.arrivals(buyers),
            Self::Replay(replay) => replay
                .lines
                .iter()
                .take(usize::try_from(buyers).unwrap_or(usize::MAX))
                .map(|line| Duration::from_secs_f64(line.offset_ms / 1000.0 / replay.speed))
                .collect(),
        }
    }
}

/// `5s`, `500ms`, `2m` or plain seconds.
fn time(raw: &str) -> Option<Duration> {
    let raw = raw.trim();
    let (number, unit) = if let Some(n) = raw.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = raw.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = raw.strip_suffix('m') {
        (n, 60.0)
    } else {
        (raw, 1.0)
    };
    number
        .parse::<f64>()
        .ok()
        .filter(|n| n.is_finite() && *n >= 0.0)
        .map(|n| Duration::from_secs_f64(n * unit))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn per_second(offsets: &[Duration]) -> Vec<usize> {
        let last = offsets.last().map_or(0, |d| d.as_secs() as usize);
        let mut out = vec![0; last + 1];
        for d in offsets {
            out[d.as_secs() as usize] += 1;
        }
        out
    }

    #[test]
    fn a_ramp_follows_its_rate_second_by_second() {
        // 0 -> 1000/s over 10 s, then 1000/s for 5 s: 5,000 + 5,000.
        let stages = Stages::parse("0:0/s, 10s:1000/s, 15s:1000/s").expect("valid");
        assert_eq!(stages.total(), 10_000.0);
        let offsets = stages.arrivals(u64::MAX);
        assert_eq!(offsets.len(), 10_000);
        assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "in order");
        let seconds = per_second(&offsets);
        // Second k of the ramp brings the area under it: 100k + 50.
        for (k, got) in seconds.iter().take(10).enumerate() {
            let want = 100 * k + 50;
            assert!(got.abs_diff(want) <= 1, "second {k}: {got} against {want}");
        }
        for got in &seconds[10..15] {
            assert!(got.abs_diff(1000) <= 1, "{seconds:?}");
        }
    }

    #[test]
    fn a_step_is_a_spike_and_a_cap_cuts_the_crowd() {
        let stages =
            Stages::parse("0:100/s,2s:100/s,2s:5000/s,3s:5000/s,3s:100/s,5s:100/s").expect("valid");
        let seconds = per_second(&stages.arrivals(u64::MAX));
        assert_eq!(seconds, [100, 100, 5000, 100, 100]);
        assert_eq!(stages.arrivals(150).len(), 150);
        assert_eq!(
            Arrival::Rate(4.0).offsets(3),
            [0, 250, 500].map(Duration::from_millis)
        );
    }

    #[test]
    fn malformed_stages_are_refused_with_the_stage() {
        assert_eq!(
            Stages::parse("0:10/s,5x:10/s"),
            Err(StagesError::Stage("5x:10/s".into()))
        );
        assert_eq!(
            Stages::parse("0:10/s,5s:10/s,2s:0/s"),
            Err(StagesError::Backwards("2s:0/s".into()))
        );
        assert_eq!(Stages::parse("0:10/s"), Err(StagesError::TooFew));
        assert_eq!(Stages::parse("1s:10/s,2s:10/s"), Err(StagesError::TooFew));
        assert_eq!(Stages::parse("0:0/s,5s:0/s"), Err(StagesError::Empty));
        assert_eq!(
            Stages::parse("0:-5/s,5s:0/s"),
            Err(StagesError::Stage("0:-5/s".into()))
        );
    }
}
