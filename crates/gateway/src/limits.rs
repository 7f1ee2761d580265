//! The gateway's own protection: a bucket for the whole instance and one
//! per buyer, both GCRA (the `governor` crate: one "theoretical arrival
//! time" per bucket, so a check is one compare-and-set and a buyer costs
//! one map entry).
//!
//! These limits are per instance: behind N gateways a buyer gets N times
//! the rate unless the load balancer pins buyers to instances. What may be
//! bought is bounded elsewhere, exactly and across instances (the admission
//! window and the per-user limit in Redis); these only stop one instance,
//! or one client, from flooding what sits behind it.

use std::num::NonZeroU32;
use std::time::Duration;

use flashsale_core::ids::UserId;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{NotUntil, Quota, RateLimiter};

/// A rate with a burst: `per_second` on average, up to `burst` at once.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
    quota: Quota,
}

impl Rate {
    /// `None` when `per_second` is 0: no limit.
    pub fn new(per_second: f64, burst: u32) -> Option<Self> {
        if per_second <= 0.0 || !per_second.is_finite() {
            return None;
        }
        // A fractional rate (0.5/s) is a period; governor's per-second
        // constructors take whole numbers only.
        let period = Duration::from_secs_f64(1.0 / per_second).max(Duration::from_nanos(1));
        let burst = NonZeroU32::new(burst.max(1))?;
        Some(Self {
            per_second,
            burst: burst.get(),
            quota: Quota::with_period(period)?.allow_burst(burst),
        })
    }

    fn denied<C: Clock>(&self, refused: &NotUntil<C::Instant>, clock: &C) -> Denied {
        Denied {
            retry_after: refused.wait_time_from(clock.now()),
            limit: self.burst,
            per_second: self.per_second,
        }
    }
}

/// Over the limit: try again after `retry_after`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Denied {
    pub retry_after: Duration,
    /// The bucket's size, for the `RateLimit-Limit` header.
    pub limit: u32,
    /// The bucket's average rate.
    pub per_second: f64,
}

impl Denied {
    /// Whole seconds for `Retry-After`, never 0 (a client would hammer).
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }
}

type Direct<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;
type Keyed<C> =
    RateLimiter<UserId, DefaultKeyedStateStore<UserId>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// One bucket for every purchase this instance takes; `None`: no limit.
#[derive(Debug)]
pub struct GlobalLimiter<C: Clock = DefaultClock>(Option<(Rate, Direct<C>)>);

impl GlobalLimiter {
    pub fn new(rate: Option<Rate>) -> Self {
        Self::with_clock(rate, DefaultClock::default())
    }
}

impl<C: Clock> GlobalLimiter<C> {
    pub fn with_clock(rate: Option<Rate>, clock: C) -> Self {
        Self(rate.map(|rate| (rate, RateLimiter::direct_with_clock(rate.quota, clock))))
    }

    pub fn check(&self) -> Result<(), Denied> {
        let Some((rate, bucket)) = &self.0 else {
            return Ok(());
        };
        bucket
            .check()
            .map_err(|refused| rate.denied(&refused, bucket.clock()))
    }
}

/// One bucket per buyer; `None`: no limit. A bucket that has refilled is
/// forgotten by `prune`, so memory follows the buyers active in the last
/// `burst / per_second` seconds.
#[derive(Debug)]
pub struct UserLimiter<C: Clock = DefaultClock>(Option<(Rate, Keyed<C>)>);

impl UserLimiter {
    pub fn new(rate: Option<Rate>) -> Self {
        Self::with_clock(rate, DefaultClock::default())
    }
}

impl<C: Clock> UserLimiter<C> {
    pub fn with_clock(rate: Option<Rate>, clock: C) -> Self {
        let store = DefaultKeyedStateStore::default();
        Self(rate.map(|rate| (rate, RateLimiter::new(rate.quota, store, clock))))
    }

    pub fn check(&self, user: &UserId) -> Result<(), Denied> {
        let Some((rate, buckets)) = &self.0 else {
            return Ok(());
        };
        buckets
            .check_key(user)
            .map_err(|refused| rate.denied(&refused, buckets.clock()))
    }

    /// Forgets buckets that are full again; returns how many remain.
    pub fn prune(&self) -> usize {
        let Some((_, buckets)) = &self.0 else {
            return 0;
        };
        // Not shrunk: rehashing what is left every second cost 3.5 times
        // the prune itself (2 million buyers: 0.5 s against 0.14 s), on a
        // runtime thread; the map's room is reused by the next crowd.
        buckets.retain_recent();
        buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;

    fn user(name: &str) -> UserId {
        UserId::parse(name).expect("a user id")
    }

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let clock = FakeRelativeClock::default();
        let global = GlobalLimiter::with_clock(Rate::new(10.0, 3), clock.clone());
        for _ in 0..3 {
            global.check().expect("within the burst");
        }
        let denied = global.check().expect_err("the fourth at once");
        assert_eq!(denied.retry_after, Duration::from_millis(100));
        assert_eq!((denied.retry_after_secs(), denied.limit), (1, 3));
        clock.advance(Duration::from_millis(100));
        assert!(global.check().is_ok());
    }

    #[test]
    fn a_fractional_rate_is_a_period() {
        let clock = FakeRelativeClock::default();
        let global = GlobalLimiter::with_clock(Rate::new(0.5, 1), clock.clone());
        global.check().expect("the first");
        let denied = global.check().expect_err("the second at once");
        assert_eq!(denied.retry_after, Duration::from_secs(2));
        clock.advance(Duration::from_secs(2));
        assert!(global.check().is_ok());
    }

    #[test]
    fn zero_means_no_limit() {
        assert!(Rate::new(0.0, 10).is_none());
        let users = UserLimiter::new(None);
        for _ in 0..1000 {
            assert!(users.check(&user("ann")).is_ok());
        }
        assert_eq!(users.prune(), 0);
    }

    #[test]
    fn buyers_have_their_own_buckets_forgotten_once_full_again() {
        let clock = FakeRelativeClock::default();
        let users = UserLimiter::with_clock(Rate::new(1.0, 2), clock.clone());
        assert!(users.check(&user("ann")).is_ok());
        assert!(users.check(&user("ann")).is_ok());
        assert!(users.check(&user("ann")).is_err());
        assert!(users.check(&user("ben")).is_ok());
        assert_eq!(users.prune(), 2, "both buckets are still refilling");
        clock.advance(Duration::from_secs(3));
        assert_eq!(users.prune(), 0, "both are full again");
    }

    #[test]
    fn the_global_bucket_counts_every_thread() {
        let global = std::sync::Arc::new(GlobalLimiter::new(Rate::new(0.001, 1000)));
        let passed: usize = (0..4)
            .map(|_| {
                let global = global.clone();
                std::thread::spawn(move || (0..500).filter(|_| global.check().is_ok()).count())
            })
            .map(|t| t.join().expect("thread"))
            .sum();
        assert_eq!(passed, 1000);
    }
}
