//! Noticing that this process was not running for a while.
//!
//! A member stopped (SIGSTOP, a stalled VM, a runtime starved for seconds)
//! for longer than its group session has lost its partitions without
//! knowing it yet: the broker gave them to another member, which may have
//! gone further. On waking, before librdkafka has judged its session, what
//! it commits would take the group's offsets back; tansu 0.6 accepts a
//! commit of any generation, so only the member itself can refuse to make
//! it. The committer looks at the time between its own turns: after a gap
//! it holds its commits until librdkafka has had time to find the session
//! gone (it does so at once on waking, and the assignment is then lost)
//! or alive (the next heartbeat answers).

use std::time::{Duration, Instant};

/// How the committer's turn looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Turns came as often as they should: commit.
    Go,
    /// This turn came `gap` after the last one: do not commit yet.
    Woke { gap: Duration },
    /// Still holding after a gap.
    Holding,
}

#[derive(Debug)]
pub struct FreezeWatch {
    /// A gap between turns longer than this is a freeze.
    frozen_after: Duration,
    /// How long commits are held after one.
    hold: Duration,
    last: Option<Instant>,
    held_until: Option<Instant>,
}

impl FreezeWatch {
    pub fn new(frozen_after: Duration, hold: Duration) -> Self {
        Self {
            frozen_after,
            hold,
            last: None,
            held_until: None,
        }
    }

    /// A turn at `now` (monotonic: it goes on while the process is stopped).
    pub fn turn(&mut self, now: Instant) -> Turn {
        let gap = self.last.map(|last| now.saturating_duration_since(last));
        self.last = Some(now);
        if let Some(gap) = gap.filter(|gap| *gap > self.frozen_after) {
            self.held_until = Some(now + self.hold);
            return Turn::Woke { gap };
        }
        match self.held_until {
            Some(until) if now < until => Turn::Holding,
            _ => Turn::Go,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_are_held_for_a_while_after_a_gap_and_only_then() {
        let s = Duration::from_secs;
        let t0 = Instant::now();
        let mut watch = FreezeWatch::new(s(3), s(3));
        assert_eq!(watch.turn(t0), Turn::Go, "the first turn");
        assert_eq!(watch.turn(t0 + s(1)), Turn::Go);
        assert_eq!(watch.turn(t0 + s(4)), Turn::Go, "3 s is not a freeze");
        assert_eq!(watch.turn(t0 + s(16)), Turn::Woke { gap: s(12) });
        assert_eq!(watch.turn(t0 + s(17)), Turn::Holding);
        assert_eq!(watch.turn(t0 + s(18)), Turn::Holding);
        assert_eq!(watch.turn(t0 + s(19)), Turn::Go, "held for 3 s");
        assert_eq!(watch.turn(t0 + s(30)), Turn::Woke { gap: s(11) }, "again");
    }
}
