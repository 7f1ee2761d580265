//! Retrying an effect until it is durable, its deadline passes, or the
//! service is told to stop.
//!
//! A worker that cannot reach Redis, Kafka or DynamoDB must neither drop
//! the message nor commit past it: it waits (with capped exponential
//! backoff) and tries again. Without a deadline (`durable`) it gives the
//! message up only at shutdown, leaving its offset uncommitted for the next
//! owner. With one (`durable_until`) it stops when the deadline passes, and
//! the worker moves the purchase on (its failure path, or the message
//! parked at the tail of its topic) instead of holding its partition.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::bus::consumer::Abandoned;

/// The first wait is 25 to 50 ms; each next one twice as long, up to 1 to
/// 2 s.
const FIRST_DELAY: Duration = Duration::from_millis(25);
const MAX_DELAY: Duration = Duration::from_secs(1);
/// How long an attempt made at (or past) its deadline may take.
const LAST_ATTEMPT: Duration = Duration::from_secs(1);

/// Capped exponential backoff with jitter (backon's): each wait is the
/// current delay plus a random part of it, so that workers that failed
/// together (a broker restart, a processor outage) do not retry together.
///
/// Only the delays are backon's. Its retry loop is not used: ours lets a
/// shutdown end the wait but never an attempt in flight (a commit half
/// made is worse than one made or not), shortens the last wait so that one
/// attempt lands on the deadline itself, and bounds each attempt by the
/// deadline; backon's `Retry` cancels whatever it is polling and stops at
/// a total of delays instead.
#[derive(Debug)]
pub struct Backoff(backon::ExponentialBackoff);

impl Default for Backoff {
    fn default() -> Self {
        use backon::BackoffBuilder;
        Self(
            backon::ExponentialBuilder::new()
                .with_min_delay(FIRST_DELAY)
                .with_max_delay(MAX_DELAY)
                .with_jitter()
                .without_max_times()
                .build(),
        )
    }
}

impl Backoff {
    /// The next wait; the one after is about twice as long, up to the cap.
    pub fn next_wait(&mut self) -> Duration {
        // Without a limit on times or total, the sequence does not end.
        self.0.next().unwrap_or(MAX_DELAY * 2)
    }
}

/// Whether an error is worth another attempt.
pub trait Transience {
    fn is_transient(&self) -> bool;
}

/// Why a retried effect did not happen.
#[derive(Debug, thiserror::Error)]
pub enum Stop {
    /// The worker is shutting down.
    #[error(transparent)]
    Abandoned(#[from] Abandoned),
    /// Still failing at its deadline: the purchase takes its failure path,
    /// or its message is parked (`kafka::park`), rather than holding its
    /// partition.
    #[error("gave up: {0}")]
    GaveUp(String),
}

/// `FLASHSALE_RETRY_DEADLINE_MS`: how long a worker retries a store call
/// (or the payment service) for one message before it gives up on it.
pub fn deadline_after(
    env: &crate::service::settings::Env,
) -> Result<Duration, crate::service::settings::SettingError> {
    env.millis("RETRY_DEADLINE_MS", 30_000)
}

/// Runs `attempt` until it succeeds, fails permanently, or (when given)
/// `deadline` passes, backing off between transient failures.
async fn retrying<T, E, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    deadline: Option<Instant>,
    mut attempt: F,
) -> Result<Result<T, E>, Stop>
where
    E: Transience + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::default();
    loop {
        let outcome = match deadline {
            None => attempt().await,
            // A call that hangs (a node that accepts and never answers) is
            // bounded too; each attempt gets a moment even at the deadline.
            Some(deadline) => {
                let bound = deadline.max(Instant::now() + LAST_ATTEMPT);
                match tokio::time::timeout_at(bound, attempt()).await {
                    Ok(outcome) => outcome,
                    Err(_) => {
                        tracing::error!("{what} did not answer by its deadline; giving up");
                        return Err(Stop::GaveUp(format!("{what}: no answer by its deadline")));
                    }
                }
            }
        };
        match outcome {
            Err(error) if error.is_transient() => {
                let now = Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    tracing::error!(%error, "{what} still fails at its deadline; giving up");
                    return Err(Stop::GaveUp(format!("{what}: {error}")));
                }
                let mut delay = backoff.next_wait();
                if let Some(deadline) = deadline {
                    // One last attempt at the deadline itself.
                    delay = delay.min(deadline - now);
                }
                tracing::warn!(%error, ?delay, "{what} failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        return Err(Abandoned(format!("{what}: shutting down after: {error}")).into());
                    }
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            other => return Ok(other),
        }
    }
}

/// Runs `attempt` until it succeeds or fails permanently, backing off
/// between transient failures; `Err(Abandoned)` only on shutdown.
pub async fn until_done<T, E, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    attempt: F,
) -> Result<Result<T, E>, Abandoned>
where
    E: Transience + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    match retrying(what, shutdown, None, attempt).await {
        Ok(done) => Ok(done),
        Err(Stop::Abandoned(abandoned)) => Err(abandoned),
        Err(Stop::GaveUp(why)) => Err(Abandoned(why)),
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

/// `durable` with a wall-clock bound: past `deadline`, `Stop::GaveUp`, and
/// the caller moves the purchase on. A permanent error abandons the message,
/// as with `durable`: it will not go away by waiting, and is a bug to see.
pub async fn durable_until<T, E, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    deadline: Instant,
    attempt: F,
) -> Result<T, Stop>
where
    E: Transience + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    retrying(what, shutdown, Some(deadline), attempt)
        .await?
        .map_err(|e| Abandoned(format!("{what}: {e}")).into())
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
impl Transience for crate::bus::kafka::KafkaFailure {
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
    fn backoff_doubles_to_its_cap_with_jitter_up_to_as_much_again() {
        let mut backoff = Backoff::default();
        let waits: Vec<Duration> = (0..12).map(|_| backoff.next_wait()).collect();
        let mut delay = FIRST_DELAY;
        for wait in &waits {
            assert!(
                *wait >= delay && *wait <= delay * 2,
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

    #[tokio::test]
    async fn a_deadline_ends_the_retries_of_a_call_that_keeps_failing() {
        let shutdown = CancellationToken::new();
        let started = Instant::now();
        let mut calls = 0;
        let result = durable_until(
            "test",
            &shutdown,
            started + Duration::from_millis(300),
            || {
                calls += 1;
                async { Err::<(), _>(Flaky(true)) }
            },
        )
        .await;
        assert!(matches!(result, Err(Stop::GaveUp(_))), "{result:?}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(2),
            "gave up after {took:?}"
        );
        assert!(calls >= 3, "{calls} attempts");
        let started = Instant::now();
        let result = durable_until(
            "test",
            &shutdown,
            started + Duration::from_millis(300),
            std::future::pending::<Result<(), Flaky>>,
        )
        .await;
        assert!(
            matches!(result, Err(Stop::GaveUp(_))),
            "a call that hangs: {result:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        let result = durable_until("test", &shutdown, Instant::now(), || async {
            Err::<(), _>(Flaky(false))
        })
        .await;
        assert!(
            matches!(result, Err(Stop::Abandoned(_))),
            "a permanent error: {result:?}"
        );
        let result = durable_until("test", &shutdown, Instant::now(), || async {
            Ok::<_, Flaky>(7)
        })
        .await;
        assert!(matches!(result, Ok(7)));
    }
}
