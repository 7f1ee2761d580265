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
    let mut delay = FIRST_DELAY;
    loop {
        match attempt().await {
            Err(error) if error.is_transient() => {
                tracing::warn!(%error, ?delay, "{what} failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        return Err(Abandoned(format!("{what}: shutting down after: {error}")));
                    }
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(MAX_DELAY);
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
