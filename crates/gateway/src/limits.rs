//! The gateway's own protection: a token bucket for the whole instance and
//! one per buyer, both GCRA (a single "theoretical arrival time" per bucket,
//! so a check is one compare-and-set and a buyer costs one map entry).
//!
//! These limits are per instance: behind N gateways a buyer gets N times
//! the rate unless the load balancer pins buyers to instances. What may be
//! bought is bounded elsewhere, exactly and across instances (the admission
//! window and the per-user limit in Redis); these only stop one instance,
//! or one client, from flooding what sits behind it.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A rate with a burst: `per_second` on average, up to `burst` at once.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
    interval_ns: u64,
    /// How far ahead of now the arrival time may run: `burst - 1` intervals.
    tolerance_ns: u64,
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

impl Rate {
    /// `None` when `per_second` is 0: no limit.
    pub fn new(per_second: f64, burst: u32) -> Option<Self> {
        if per_second <= 0.0 || !per_second.is_finite() {
            return None;
        }
        let interval_ns = (1e9 / per_second).max(1.0) as u64;
        Some(Self {
            per_second,
            burst: burst.max(1),
            interval_ns,
            tolerance_ns: interval_ns.saturating_mul(u64::from(burst.max(1) - 1)),
        })
    }

    /// The bucket's next arrival time if one more request fits at `now`.
    fn admit(&self, tat: u64, now: u64) -> Result<u64, Denied> {
        let tat = tat.max(now);
        let ahead = tat - now;
        if ahead > self.tolerance_ns {
            return Err(Denied {
                retry_after: Duration::from_nanos(ahead - self.tolerance_ns),
                limit: self.burst,
                per_second: self.per_second,
            });
        }
        Ok(tat + self.interval_ns)
    }
}

/// Nanoseconds since the limiter started: GCRA needs a monotonic clock.
#[derive(Debug, Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn now(&self) -> u64 {
        // Starts at one second so that a fresh bucket (arrival time 0) is
        // full from the first request.
        self.0.elapsed().as_nanos() as u64 + 1_000_000_000
    }
}

/// One bucket for every purchase this instance takes.
#[derive(Debug)]
pub struct GlobalLimiter {
    rate: Option<Rate>,
    tat: AtomicU64,
    clock: Clock,
}

impl GlobalLimiter {
    pub fn new(rate: Option<Rate>) -> Self {
        Self {
            rate,
            tat: AtomicU64::new(0),
            clock: Clock(Instant::now()),
        }
    }

    pub fn check(&self) -> Result<(), Denied> {
        let Some(rate) = self.rate else {
            return Ok(());
        };
        let now = self.clock.now();
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let next = rate.admit(tat, now)?;
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(current) => tat = current,
            }
        }
    }
}

/// One bucket per buyer, in shards so buyers rarely wait on each other's
/// lock. A bucket that has refilled is forgotten by `prune`, so memory
/// follows the buyers active in the last `burst / per_second` seconds.
#[derive(Debug)]
pub struct UserLimiter {
    rate: Option<Rate>,
    shards: Vec<Mutex<HashMap<String, u64>>>,
    hasher: RandomState,
    clock: Clock,
}

const SHARDS: usize = 64;

impl UserLimiter {
    pub fn new(rate: Option<Rate>) -> Self {
        Self {
            rate,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            clock: Clock(Instant::now()),
        }
    }

    pub fn check(&self, user: &str) -> Result<(), Denied> {
        let Some(rate) = self.rate else {
            return Ok(());
        };
        let shard = &self.shards[self.hasher.hash_one(user) as usize % SHARDS];
        let now = self.clock.now();
        // A poisoned shard only means another request panicked mid-update
        // of a plain integer; the map is still sound.
        let mut buckets = shard.lock().unwrap_or_else(|e| e.into_inner());
        let tat = buckets.get(user).copied().unwrap_or(0);
        let next = rate.admit(tat, now)?;
        match buckets.get_mut(user) {
            Some(slot) => *slot = next,
            None => {
                buckets.insert(user.to_owned(), next);
            }
        }
        Ok(())
    }

    /// Forgets buckets that are full again; returns how many remain.
    pub fn prune(&self) -> usize {
        let now = self.clock.now();
        self.shards
            .iter()
            .map(|shard| {
                let mut buckets = shard.lock().unwrap_or_else(|e| e.into_inner());
                buckets.retain(|_, tat| *tat > now);
                buckets.len()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let rate = Rate::new(10.0, 3).expect("a rate");
        let now = 5_000_000_000;
        let mut tat = 0;
        for _ in 0..3 {
            tat = rate.admit(tat, now).expect("within the burst");
        }
        let denied = rate.admit(tat, now).expect_err("the fourth at once");
        assert_eq!(denied.retry_after, Duration::from_millis(100));
        assert_eq!(denied.retry_after_secs(), 1);
        assert!(rate.admit(tat, now + 100_000_000).is_ok());
    }

    #[test]
    fn zero_means_no_limit() {
        assert!(Rate::new(0.0, 10).is_none());
        let users = UserLimiter::new(None);
        for _ in 0..1000 {
            assert!(users.check("ann").is_ok());
        }
        assert_eq!(users.prune(), 0);
    }

    #[test]
    fn buyers_have_their_own_buckets() {
        let users = UserLimiter::new(Rate::new(1.0, 2));
        assert!(users.check("ann").is_ok());
        assert!(users.check("ann").is_ok());
        assert!(users.check("ann").is_err());
        assert!(users.check("ben").is_ok());
        assert_eq!(users.prune(), 2, "both buckets are still refilling");
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
