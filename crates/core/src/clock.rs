//! Wall-clock time in Unix milliseconds: what the scripts receive as `now`
//! and what every record's timestamps are made of.

use std::sync::atomic::{AtomicI64, Ordering};

/// How far this process's clock is off (`FLASHSALE_CLOCK_OFFSET_MS`).
static OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// Sets this process's clock `offset_ms` away from the machine's: the
/// clock skew of a machine whose NTP is off, for the chaos campaign. Only
/// the wall clock every decision of ours reads moves; the monotonic clock
/// (timeouts, backoff) and librdkafka's own clocks do not, as on a real
/// skewed machine, where the kernel's timed waits agree with the process.
/// (libfaketime cannot do this: it fakes what the process reads, not the
/// kernel's deadlines, so librdkafka's absolute-time waits misfire.)
pub fn skew(offset_ms: i64) {
    OFFSET_MS.store(offset_ms, Ordering::Relaxed);
}

pub fn now_ms() -> u64 {
    skewed(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        OFFSET_MS.load(Ordering::Relaxed),
    )
}

fn skewed(machine_ms: u64, offset_ms: i64) -> u64 {
    machine_ms.saturating_add_signed(offset_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skew_moves_the_clock_either_way_and_never_below_zero() {
        assert_eq!(skewed(10_000, 3_000), 13_000);
        assert_eq!(skewed(10_000, -3_000), 7_000);
        assert_eq!(skewed(1_000, -3_000), 0);
    }
}
