//! A circuit breaker around the payment service.
//!
//! After `failures` transient failures in a row (timeouts, `5xx`, refused
//! connections) it opens: no charge is sent for `open_for`, and the consumer
//! pauses its partitions, so reservations wait in Kafka (keeping their TTL)
//! instead of piling up as failing sagas. Then one probe goes through
//! (half-open); its success closes the breaker, its failure opens it again.
//! An outage therefore costs waiting, never a cancelled order.
//!
//! A decline or a refused request is an answer, so it counts as a success.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flashsale_core::bus::consumer::Abandoned;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is out; everyone else waits for its answer.
    HalfOpen,
}

pub struct Breaker {
    state: Arc<Mutex<State>>,
    failures: u32,
    open_for: Duration,
    /// `true` while open or probing: what the consumer pauses on.
    open: Arc<watch::Sender<bool>>,
}

impl Breaker {
    pub fn new(failures: u32, open_for: Duration) -> Self {
        Self {
            state: Arc::new(Mutex::new(State::Closed { failures: 0 })),
            failures: failures.max(1),
            open_for,
            open: Arc::new(watch::channel(false).0),
        }
    }

    /// Follows whether the breaker is open.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.open.subscribe()
    }

    #[cfg(test)]
    pub fn is_open(&self) -> bool {
        *self.open.borrow()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A plain value: a panic elsewhere cannot have left it torn.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until a call may go out: at once while closed; while open,
    /// until it is this caller's turn to probe or the probe closed it.
    pub async fn admit(&self, shutdown: &CancellationToken) -> Result<(), Abandoned> {
        let mut changes = self.open.subscribe();
        loop {
            let wait = {
                let mut state = self.state();
                match *state {
                    State::Closed { .. } => return Ok(()),
                    State::Open { until } if Instant::now() >= until => {
                        *state = State::HalfOpen;
                        tracing::info!("payment breaker half-open: probing");
                        return Ok(());
                    }
                    State::Open { until } => Some(until),
                    State::HalfOpen => None,
                }
            };
            let until = wait.unwrap_or_else(|| Instant::now() + self.open_for);
            tokio::select! {
                _ = shutdown.cancelled() => {
                    return Err(Abandoned("shutting down while the payment breaker is open".into()));
                }
                _ = tokio::time::sleep_until(until) => {}
                _ = changes.changed() => {}
            }
        }
    }

    /// When the pause is over, lets the consumer take reservations again
    /// if nobody has probed yet: the calls that opened the breaker may
    /// all have ended (given up, past their deadline), and with the
    /// consumer paused no new saga would ever come to probe.
    fn resume_at(&self, until: Instant) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (state, open) = (self.state.clone(), self.open.clone());
        runtime.spawn(async move {
            tokio::time::sleep_until(until).await;
            let still = *state.lock().unwrap_or_else(|e| e.into_inner()) == State::Open { until };
            if still {
                open.send_if_modified(|was| std::mem::replace(was, false));
            }
        });
    }

    /// The answer of a call `admit` let through.
    pub fn record(&self, ok: bool) {
        let mut state = self.state();
        let next = match (*state, ok) {
            (_, true) => State::Closed { failures: 0 },
            (State::Closed { failures }, false) if failures + 1 < self.failures => State::Closed {
                failures: failures + 1,
            },
            // Opened just now, or a failed probe, or a late failure of a
            // call admitted before it opened: (re)open from now.
            (State::Closed { .. } | State::HalfOpen, false) => State::Open {
                until: Instant::now() + self.open_for,
            },
            (open @ State::Open { .. }, false) => open,
        };
        if next != *state {
            if let State::Open { until } = next {
                self.resume_at(until);
            }
            match next {
                State::Open { .. } if !matches!(*state, State::Open { .. }) => {
                    tracing::warn!(open_for = ?self.open_for, "payment breaker open")
                }
                State::Closed { failures: 0 } if !matches!(*state, State::Closed { .. }) => {
                    tracing::info!("payment breaker closed")
                }
                _ => {}
            }
            *state = next;
        }
        let open = !matches!(next, State::Closed { .. });
        self.open
            .send_if_modified(|was| std::mem::replace(was, open) != open);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_failures_probes_once_and_closes_on_success() {
        let breaker = std::sync::Arc::new(Breaker::new(3, Duration::from_secs(2)));
        let shutdown = CancellationToken::new();
        for _ in 0..2 {
            breaker.admit(&shutdown).await.unwrap();
            breaker.record(false);
        }
        assert!(!breaker.is_open(), "two failures are not enough");
        breaker.admit(&shutdown).await.unwrap();
        breaker.record(false);
        assert!(breaker.is_open());

        // While open, nobody goes through until the pause is over; then
        // exactly one probe does.
        let started = Instant::now();
        breaker.admit(&shutdown).await.unwrap();
        assert!(started.elapsed() >= Duration::from_secs(2));
        let second = {
            let (breaker, shutdown) = (breaker.clone(), shutdown.clone());
            tokio::spawn(async move { breaker.admit(&shutdown).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!second.is_finished(), "a second caller waits for the probe");
        breaker.record(true);
        second.await.unwrap().unwrap();
        assert!(!breaker.is_open());
    }

    #[tokio::test(start_paused = true)]
    async fn the_consumer_resumes_after_the_pause_when_no_call_is_left_to_probe() {
        let breaker = Breaker::new(1, Duration::from_secs(1));
        let shutdown = CancellationToken::new();
        let mut open = breaker.watch();
        breaker.admit(&shutdown).await.unwrap();
        breaker.record(false);
        assert!(*open.borrow_and_update(), "opened");
        // The saga that failed gives up; nobody calls admit again.
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(5), open.changed())
            .await
            .expect("the consumer is let go within the pause and a little")
            .unwrap();
        assert!(!*open.borrow(), "resumed");
        assert!(started.elapsed() >= Duration::from_secs(1));
        // The next saga probes, and closes it.
        breaker.admit(&shutdown).await.unwrap();
        breaker.record(true);
        assert!(!breaker.is_open());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_opens_it_again_and_shutdown_releases_waiters() {
        let breaker = Breaker::new(1, Duration::from_secs(1));
        let shutdown = CancellationToken::new();
        breaker.admit(&shutdown).await.unwrap();
        breaker.record(false);
        breaker.admit(&shutdown).await.unwrap();
        breaker.record(false);
        assert!(breaker.is_open(), "the probe failed");
        shutdown.cancel();
        assert!(breaker.admit(&shutdown).await.is_err());
    }
}
