//! Retrying an effect until it is durable or the service is told to stop.
//!
//! A worker that cannot reach Redis, Kafka or DynamoDB must neither drop
//! the message nor commit past it: it waits (with capped exponential
//! backoff) and tries again, and gives the message up only at shutdown,
//! leaving its offset uncommitted for the next owner.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::consume::Abandoned;

const FIRST_DELAY: Duration = Duration::from_millis(50);
const MAX_DELAY: Duration = Duration::from_secs(2);

/// Capped exponential backoff with jitter: each wait is half the current
/// delay plus a random part of the other half, so that workers that failed
/// together (a broker restart, a processor outage) do not retry together.
#[derive(Debug, Clone)]
pub struct Backoff {
    delay: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { delay: FIRST_DELAY }
    }
}

impl Backoff {
    /// The next wait; the one after is twice as long, up to the cap.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.delay / 2 + self.delay.mul_f64(random_fraction() / 2.0);
        self.delay = (self.delay * 2).min(MAX_DELAY);
        wait
    }
}

/// A number in [0, 1): SplitMix64 over a counter seeded by the clock. Good
/// enough to spread retries; not for anything that must be unpredictable.
fn random_fraction() -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    let mut z = STATE
        .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
        .wrapping_add(nanos);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// Whether an error is worth another attempt.
pub trait Transience {
    fn is_transient(&self) -> bool;
}

/// Runs `attempt` until it succeeds or fails permanently, backing off
/// between transient failures; `Err(Abandoned)` only on shutdown.
pub async fn until_done<T, E, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    mut attempt: F,
) -> Result<Result<T, E>, Abandoned>
where
    E: Transience + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::default();
    loop {
        match attempt().await {
            Err(error) if error.is_transient() => {
                let delay = backoff.next_wait();
                tracing::warn!(%error, ?delay, "{what} failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        return Err(Abandoned(format!("{what}: shutting down after: {error}")));
                    }
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            other => return Ok(other),
        }
    }
}

/// `until_done`, for effects that must happen: a permanent error abandons
/// the message too (its offset stays uncommitted, so it is redelivered).
pub async fn durable<T, E, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    attempt: F,
) -> Result<T, Abandoned>
where
    E: Transience + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    until_done(what, shutdown, attempt)
        .await?
        .map_err(|e| Abandoned(format!("{what}: {e}")))
}

impl Transience for crate::stock::StockError {
    fn is_transient(&self) -> bool {
        crate::stock::StockError::is_transient(self)
    }
}

impl Transience for redis::RedisError {
    fn is_transient(&self) -> bool {
        crate::stock::redis_is_transient(self)
    }
}

/// Every Kafka failure to produce is retried: the producer is idempotent.
impl Transience for crate::kafka::KafkaFailure {
    fn is_transient(&self) -> bool {
        true
    }
}

/// DynamoDB request failures (throttling, timeouts, an endpoint restarting)
/// are retried; a malformed item or request is not.
impl Transience for crate::dynamo::DynamoError {
    fn is_transient(&self) -> bool {
        matches!(self, crate::dynamo::DynamoError::Request(_))
    }
}

impl Transience for crate::payment::PaymentError {
    fn is_transient(&self) -> bool {
        matches!(self, crate::payment::PaymentError::Transient(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Flaky(bool);
    impl std::fmt::Display for Flaky {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "flaky({})", self.0)
        }
    }
    impl Transience for Flaky {
        fn is_transient(&self) -> bool {
            self.0
        }
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_in_the_upper_half() {
        let mut backoff = Backoff::default();
        let waits: Vec<Duration> = (0..12).map(|_| backoff.next_wait()).collect();
        let mut delay = FIRST_DELAY;
        for wait in &waits {
            assert!(
                *wait >= delay / 2 && *wait <= delay,
                "{wait:?} for {delay:?}"
            );
            delay = (delay * 2).min(MAX_DELAY);
        }
        let distinct: std::collections::HashSet<_> =
            (0..100).map(|_| Backoff::default().next_wait()).collect();
        assert!(distinct.len() > 50, "the jitter spreads waits");
    }

    #[tokio::test]
    async fn retries_transient_then_succeeds() {
        let shutdown = CancellationToken::new();
        let mut calls = 0;
        let result = until_done("test", &shutdown, || {
            calls += 1;
            let n = calls;
            async move { if n < 3 { Err(Flaky(true)) } else { Ok(n) } }
        })
        .await;
        assert!(matches!(result, Ok(Ok(3))));
    }

    #[tokio::test]
    async fn permanent_errors_return_at_once_and_shutdown_abandons() {
        let shutdown = CancellationToken::new();
        let result = until_done("test", &shutdown, || async { Err::<(), _>(Flaky(false)) }).await;
        assert!(matches!(result, Ok(Err(Flaky(false)))));
        shutdown.cancel();
        let result = until_done("test", &shutdown, || async { Err::<(), _>(Flaky(true)) }).await;
        assert!(result.is_err());
    }
}
