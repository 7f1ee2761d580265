//! Whether a consumer group member is doing its job, as `/readyz` must say.
//!
//! A member can look alive (its process answers, the broker answers) and
//! still consume nothing: its session ran out while the broker stalled and
//! it never got partitions back, or it holds partitions and nothing is
//! delivered. The consumer loop's watchdog observes the member every
//! second and this module judges it; the judgement is a pure function of
//! what was observed, so its rules are unit-tested here without a broker.
//!
//! The rules, in order:
//! * paused on purpose (the order-worker's payment breaker): healthy;
//! * partitions assigned and a record delivered within `stall_after` (or
//!   every in-flight slot busy): healthy, without asking the broker;
//! * otherwise the broker is asked what is left to read; if it cannot
//!   tell, the member is not ready, and if that lasts `stall_after` it
//!   rejoins with a new consumer (after a broker stall, tansu 0.6 can
//!   leave a member's group requests unanswered for good on its old
//!   connections, while a new member is served);
//! * nothing left to read anywhere in the group's topics: healthy (idle);
//! * partitions assigned, none delivered for `stall_after`, and records
//!   waiting on them: not ready, and the member rejoins with a new consumer;
//! * no partitions while the group has records to read: not ready at once,
//!   unless the group's committed offsets have moved on at two looks since
//!   (then another member consumes and this one is a standby, which is
//!   healthy; one move may be this member's own last commit); after
//!   `stall_after` without progress the member rejoins with a new consumer.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::service::metrics::Registrar;
use prometheus::{
    Counter, Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry,
};

/// What is left to read, as far as the broker could say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backlog {
    /// Not asked: the member was visibly consuming.
    NotAsked,
    /// The broker did not answer the questions.
    Unknown(String),
    Known {
        /// Records past the group's committed offsets, over every
        /// partition of the member's topics.
        group_unread: i64,
        /// Records past this member's position on its own partitions.
        mine_unread: i64,
        /// The sum of the group's committed offsets: it grows while anyone
        /// in the group consumes.
        committed_sum: i64,
    },
}

/// One look at a member.
#[derive(Debug, Clone)]
pub struct Observation {
    pub paused: bool,
    /// Every in-flight slot is taken: it is not fetching because it is busy.
    pub saturated: bool,
    pub assigned: usize,
    pub since_delivery: Duration,
    pub backlog: Backlog,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Healthy,
    Unhealthy {
        reason: String,
        /// Give up this consumer and join the group with a new one.
        rejoin: bool,
    },
}

/// The judge's memory between observations.
#[derive(Debug)]
pub struct Judge {
    stall_after: Duration,
    unassigned: Option<Unassigned>,
    /// Since when the broker has not been able to say what is left.
    unknown_since: Option<Instant>,
    last_rejoin: Option<Instant>,
}

#[derive(Debug)]
struct Unassigned {
    since: Instant,
    committed_sum: Option<i64>,
    progress_at: Option<Instant>,
    /// Observations that found the group's commits moved on. The first may
    /// be this member's own, as it let its partitions go; a member that
    /// consumes commits again and again.
    advances: u32,
}

impl Judge {
    pub fn new(stall_after: Duration) -> Self {
        Self {
            stall_after,
            unassigned: None,
            unknown_since: None,
            last_rejoin: None,
        }
    }

    /// Whether the broker must be asked about the backlog to judge `o`.
    pub fn needs_backlog(&self, o: &Observation) -> bool {
        !(o.paused || self.visibly_consuming(o))
    }

    fn visibly_consuming(&self, o: &Observation) -> bool {
        o.assigned > 0 && (o.saturated || o.since_delivery < self.stall_after)
    }

    /// Records that the member was just given a new consumer.
    pub fn rejoined(&mut self, now: Instant) {
        self.last_rejoin = Some(now);
        self.unassigned = None;
        self.unknown_since = None;
    }

    fn may_rejoin(&self, now: Instant) -> bool {
        self.last_rejoin
            .is_none_or(|at| now.duration_since(at) >= self.stall_after)
    }

    pub fn judge(&mut self, now: Instant, o: &Observation) -> Verdict {
        if o.assigned > 0 {
            self.unassigned = None;
        }
        if o.paused || self.visibly_consuming(o) {
            self.unknown_since = None;
            return Verdict::Healthy;
        }
        let (group_unread, mine_unread, committed_sum) = match &o.backlog {
            Backlog::NotAsked => return Verdict::Healthy,
            Backlog::Unknown(why) => {
                let since = *self.unknown_since.get_or_insert(now);
                let unknown_for = now.duration_since(since);
                return Verdict::Unhealthy {
                    reason: format!(
                        "cannot tell what is left to consume (for {} s): {why}",
                        unknown_for.as_secs()
                    ),
                    rejoin: unknown_for >= self.stall_after && self.may_rejoin(now),
                };
            }
            Backlog::Known {
                group_unread,
                mine_unread,
                committed_sum,
            } => (*group_unread, *mine_unread, *committed_sum),
        };
        self.unknown_since = None;
        if group_unread <= 0 {
            self.unassigned = None;
            return Verdict::Healthy;
        }
        if o.assigned > 0 {
            if mine_unread <= 0 {
                return Verdict::Healthy;
            }
            return Verdict::Unhealthy {
                reason: format!(
                    "{} partitions assigned but nothing delivered for {} s while {mine_unread} of their records wait",
                    o.assigned,
                    o.since_delivery.as_secs()
                ),
                rejoin: self.may_rejoin(now),
            };
        }
        let unassigned = self.unassigned.get_or_insert(Unassigned {
            since: now,
            committed_sum: Some(committed_sum),
            progress_at: None,
            advances: 0,
        });
        if unassigned
            .committed_sum
            .is_some_and(|before| committed_sum > before)
        {
            unassigned.progress_at = Some(now);
            unassigned.committed_sum = Some(committed_sum);
            unassigned.advances += 1;
        }
        let quiet_since = unassigned.progress_at.unwrap_or(unassigned.since);
        let quiet_for = now.duration_since(quiet_since);
        if unassigned.advances >= 2 && quiet_for < self.stall_after {
            // Another member is consuming: this one is a standby.
            return Verdict::Healthy;
        }
        Verdict::Unhealthy {
            reason: format!(
                "no partitions assigned for {} s while the group has {group_unread} unread records and none of them is being read",
                now.duration_since(unassigned.since).as_secs()
            ),
            rejoin: quiet_for >= self.stall_after && self.may_rejoin(now),
        }
    }
}

#[derive(Debug)]
struct Seen {
    problem: Option<String>,
    summary: String,
}

/// The member's health as the rest of the service sees it: `/readyz`
/// reads the problem, `/metrics` the gauges.
#[derive(Debug, Clone)]
pub struct ConsumerHealth {
    state: Arc<Mutex<Seen>>,
    assigned: IntGauge,
    backlog: IntGauge,
    rejoins: IntCounter,
    rebalances: IntCounter,
    rebalance_paused: Counter,
    longest_pause: Gauge,
    in_flight: IntGauge,
    handled: IntCounterVec,
    lag: IntGaugeVec,
    lag_seconds: GaugeVec,
}

/// Labels of the lag gauges, as kafka-lag-exporter names them, so that
/// dashboards and autoscalers (KEDA's Prometheus scaler, an alert) made for
/// it work unchanged.
const LAG_LABELS: [&str; 3] = ["group", "topic", "partition"];

impl ConsumerHealth {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let make = Registrar::new(registry);
        let assigned = make.gauge(
            "consumer_assigned_partitions",
            "Partitions this member of its consumer group holds",
        )?;
        let backlog = make.gauge(
            "consumer_group_backlog_records",
            "Records past the group's committed offsets on the member's topics, when last asked",
        )?;
        let rejoins = make.counter(
            "consumer_rejoins_total",
            "Times the member gave up a stalled consumer and joined its group with a new one",
        )?;
        let rebalances = make.counter(
            "consumer_rebalances_total",
            "Partition assignments this member received (each rebalance it took part in)",
        )?;
        let rebalance_paused = make.float_counter(
            "consumer_rebalance_paused_seconds_total",
            "Seconds from partitions being revoked to the next assignment: time no work was taken",
        )?;
        let longest_pause = make.float_gauge(
            "consumer_rebalance_longest_pause_seconds",
            "The longest time from partitions being revoked to the next assignment",
        )?;
        let in_flight = make.gauge(
            "consumer_in_flight_messages",
            "Messages whose work has started and not ended",
        )?;
        let handled = make.counters(
            "consumer_messages_total",
            "Messages whose work ended, by outcome (succeeded, failed)",
            &["outcome"],
        )?;
        let lag = make.gauges(
            "kafka_consumergroup_group_lag",
            "Records past the group's committed offset, for each partition this member owns",
            &LAG_LABELS,
        )?;
        let lag_seconds = make.float_gauges(
            "kafka_consumergroup_group_lag_seconds",
            "Age of the oldest record past the group's committed offset, for each partition \
             this member owns (0 when none waits)",
            &LAG_LABELS,
        )?;
        Ok(Self {
            state: Arc::new(Mutex::new(Seen {
                problem: Some("not yet observed".into()),
                summary: String::new(),
            })),
            assigned,
            backlog,
            rejoins,
            rebalances,
            rebalance_paused,
            longest_pause,
            in_flight,
            handled,
            lag,
            lag_seconds,
        })
    }

    /// What keeps the member from being ready, if anything.
    pub fn problem(&self) -> Option<String> {
        self.state
            .lock()
            .map(|seen| seen.problem.clone())
            .unwrap_or_else(|_| Some("health state poisoned".into()))
    }

    /// The last observation, in words: `consumer: N partitions assigned`
    /// (and the group's backlog when it was asked for).
    pub fn summary(&self) -> String {
        self.state
            .lock()
            .map(|seen| seen.summary.clone())
            .unwrap_or_default()
    }

    /// Publishes one judgement; logs when the member becomes unhealthy,
    /// changes its reason, or recovers.
    pub fn record(&self, observation: &Observation, verdict: &Verdict) {
        self.assigned.set(observation.assigned as i64);
        if let Backlog::Known { group_unread, .. } = observation.backlog {
            self.backlog.set(group_unread);
        }
        let now = match verdict {
            Verdict::Healthy => None,
            Verdict::Unhealthy { reason, .. } => Some(reason.clone()),
        };
        let Ok(mut seen) = self.state.lock() else {
            return;
        };
        seen.summary = match &observation.backlog {
            Backlog::Known { group_unread, .. } => format!(
                "consumer: {} partitions assigned, {group_unread} records unread by the group",
                observation.assigned
            ),
            _ => format!("consumer: {} partitions assigned", observation.assigned),
        };
        if seen.problem != now {
            match &now {
                Some(reason) => tracing::warn!(%reason, "consumer not ready"),
                None => tracing::info!("consumer ready"),
            }
            seen.problem = now;
        }
    }

    pub fn count_rejoin(&self) {
        self.rejoins.inc();
    }

    /// An assignment arrived; `paused` since partitions were last revoked.
    pub fn count_rebalance(&self, paused: Option<std::time::Duration>) {
        self.rebalances.inc();
        if let Some(paused) = paused {
            self.rebalance_paused.inc_by(paused.as_secs_f64());
            if paused.as_secs_f64() > self.longest_pause.get() {
                self.longest_pause.set(paused.as_secs_f64());
            }
        }
    }

    pub fn count_in_flight(&self, change: i64) {
        self.in_flight.add(change);
    }

    pub fn count_handled(&self, ok: bool) {
        let outcome = if ok { "succeeded" } else { "failed" };
        self.handled.with_label_values(&[outcome]).inc();
    }

    /// Publishes the lag of the partitions the member owns (`owned`) and
    /// drops the ones it no longer does.
    pub fn record_lag(
        &self,
        group: &str,
        partitions: &[crate::bus::lag::PartitionLag],
        owned: &std::collections::HashSet<(String, i32)>,
    ) {
        self.lag.reset();
        self.lag_seconds.reset();
        for p in partitions {
            if !owned.contains(&(p.topic.clone(), p.partition)) {
                continue;
            }
            let partition = p.partition.to_string();
            let labels = [group, p.topic.as_str(), partition.as_str()];
            self.lag.with_label_values(&labels).set(p.lag);
            self.lag_seconds
                .with_label_values(&labels)
                .set(p.lag_seconds.unwrap_or(0.0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALL: Duration = Duration::from_secs(15);

    fn seen(assigned: usize, since_delivery_s: u64, backlog: Backlog) -> Observation {
        Observation {
            paused: false,
            saturated: false,
            assigned,
            since_delivery: Duration::from_secs(since_delivery_s),
            backlog,
        }
    }

    fn known(group_unread: i64, mine_unread: i64, committed_sum: i64) -> Backlog {
        Backlog::Known {
            group_unread,
            mine_unread,
            committed_sum,
        }
    }

    fn rejoins(v: &Verdict) -> bool {
        matches!(v, Verdict::Unhealthy { rejoin: true, .. })
    }

    #[test]
    fn a_member_that_delivers_is_healthy_without_asking_the_broker() {
        let judge = Judge::new(STALL);
        let o = seen(3, 1, Backlog::NotAsked);
        assert!(!judge.needs_backlog(&o));
        let mut busy = seen(3, 60, Backlog::NotAsked);
        busy.saturated = true;
        assert!(!judge.needs_backlog(&busy));
        let mut paused = seen(0, 600, Backlog::NotAsked);
        paused.paused = true;
        assert!(!judge.needs_backlog(&paused));
        assert!(judge.needs_backlog(&seen(0, 0, Backlog::NotAsked)));
        assert!(judge.needs_backlog(&seen(3, 20, Backlog::NotAsked)));
    }

    #[test]
    fn an_idle_member_with_nothing_to_read_is_healthy() {
        let mut judge = Judge::new(STALL);
        let t = Instant::now();
        assert_eq!(
            judge.judge(t, &seen(3, 600, known(0, 0, 10))),
            Verdict::Healthy
        );
        assert_eq!(
            judge.judge(t, &seen(0, 600, known(0, 0, 10))),
            Verdict::Healthy
        );
    }

    #[test]
    fn an_unanswering_broker_makes_it_unready_and_rejoins_only_after_the_bound() {
        let mut judge = Judge::new(STALL);
        let t = Instant::now();
        let unknown = || Backlog::Unknown("timed out".into());
        let first = judge.judge(t, &seen(0, 0, unknown()));
        assert!(
            matches!(&first, Verdict::Unhealthy { rejoin: false, reason } if reason.contains("timed out")),
            "{first:?}"
        );
        let soon = judge.judge(t + Duration::from_secs(10), &seen(0, 10, unknown()));
        assert!(!rejoins(&soon), "{soon:?}");
        let late = judge.judge(t + STALL, &seen(0, 15, unknown()));
        assert!(rejoins(&late), "{late:?}");
        judge.rejoined(t + STALL);
        let again = judge.judge(t + STALL + Duration::from_secs(1), &seen(0, 1, unknown()));
        assert!(!rejoins(&again), "{again:?}");
        // An answer in between starts the count again.
        let mut judge = Judge::new(STALL);
        judge.judge(t, &seen(0, 0, unknown()));
        judge.judge(t + Duration::from_secs(8), &seen(0, 8, known(0, 0, 5)));
        let v = judge.judge(t + STALL, &seen(0, 15, unknown()));
        assert!(!rejoins(&v), "{v:?}");
    }

    #[test]
    fn unassigned_with_a_backlog_nobody_reads_is_unready_at_once_and_rejoins_after_the_bound() {
        let mut judge = Judge::new(STALL);
        let t = Instant::now();
        let first = judge.judge(t, &seen(0, 0, known(50, 0, 100)));
        assert!(
            matches!(&first, Verdict::Unhealthy { rejoin: false, .. }),
            "{first:?}"
        );
        let later = judge.judge(t + Duration::from_secs(10), &seen(0, 10, known(50, 0, 100)));
        assert!(!rejoins(&later), "{later:?}");
        let stalled = judge.judge(t + STALL, &seen(0, 15, known(50, 0, 100)));
        assert!(rejoins(&stalled), "{stalled:?}");
        judge.rejoined(t + STALL);
        // The new consumer gets its own time to join before another rejoin.
        let again = judge.judge(
            t + STALL + Duration::from_secs(1),
            &seen(0, 1, known(50, 0, 100)),
        );
        assert!(
            matches!(&again, Verdict::Unhealthy { rejoin: false, .. }),
            "{again:?}"
        );
        let assigned = judge.judge(
            t + STALL + Duration::from_secs(2),
            &seen(3, 0, Backlog::NotAsked),
        );
        assert_eq!(assigned, Verdict::Healthy);
    }

    #[test]
    fn a_standby_member_is_healthy_while_the_group_commits() {
        let mut judge = Judge::new(STALL);
        let t = Instant::now();
        assert!(!matches!(
            judge.judge(t, &seen(0, 0, known(50, 0, 100))),
            Verdict::Healthy
        ));
        let s = |n| t + Duration::from_secs(n);
        // One step could be this member's own last commit.
        assert!(!matches!(
            judge.judge(s(1), &seen(0, 1, known(40, 0, 110))),
            Verdict::Healthy
        ));
        assert_eq!(
            judge.judge(s(2), &seen(0, 2, known(30, 0, 120))),
            Verdict::Healthy
        );
        assert_eq!(
            judge.judge(s(10), &seen(0, 10, known(30, 0, 120))),
            Verdict::Healthy
        );
        // The others stopped too: the group's backlog sits unread.
        let quiet = judge.judge(s(17), &seen(0, 17, known(30, 0, 120)));
        assert!(rejoins(&quiet), "{quiet:?}");
    }

    /// Found in the broker-stall test: a member that lost its partitions
    /// (a rebalance, a rejoin with a new consumer) commits how far it got
    /// as it lets them go, and read that one step as another member
    /// consuming; it answered ready with the group's records unread.
    #[test]
    fn a_members_own_last_commit_does_not_make_it_a_standby() {
        let mut judge = Judge::new(STALL);
        let t = Instant::now();
        let s = |n| t + Duration::from_secs(n);
        judge.judge(t, &seen(0, 0, known(40, 0, 100)));
        for n in 1..4 {
            let v = judge.judge(s(n), &seen(0, n, known(34, 0, 106)));
            assert!(!matches!(v, Verdict::Healthy), "at {n} s: {v:?}");
        }
    }

    #[test]
    fn assigned_partitions_that_deliver_nothing_while_records_wait_mean_a_rejoin() {
        let mut judge = Judge::new(STALL);
        let t = Instant::now();
        let v = judge.judge(t, &seen(3, 20, known(80, 30, 100)));
        assert!(rejoins(&v), "{v:?}");
        // Records waiting only on other members' partitions are theirs.
        let mut judge = Judge::new(STALL);
        assert_eq!(
            judge.judge(t, &seen(1, 20, known(80, 0, 100))),
            Verdict::Healthy
        );
    }
}
