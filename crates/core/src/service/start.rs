//! What every service's start can fail on, and the one way a service binds
//! its listening address.

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;

use crate::bus::kafka::KafkaFailure;
use crate::dynamo::DynamoError;
use crate::service::retry::Transience;
use crate::stock::StockError;

/// Why a service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Kafka(#[from] KafkaFailure),
    #[error("connecting to Redis: {0}")]
    Redis(#[from] StockError),
    #[error("preparing DynamoDB tables: {0}")]
    Dynamo(#[from] DynamoError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A service's own setting that cannot be used (a key file, ...).
    #[error("{0}")]
    Setup(String),
    /// Told to stop while it still waited for a store.
    #[error("stopped before it could start: {0}")]
    Stopped(String),
}

/// What a service needs at its start from a store (the topics, the
/// tables, a connection), waited for: tried until it succeeds, fails for
/// good, or the service is told to stop. A store that is down when a
/// service starts is the ordinary case of a restart after a crash (both
/// restarted together, or the store slower to come back), not a reason to
/// exit and leave the recovery to a supervisor's backoff; the service is
/// not ready meanwhile (its ops endpoint is not up yet), and says what it
/// waits for in its log.
pub async fn wait_for<T, E, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    attempt: F,
) -> Result<T, StartError>
where
    E: Transience + std::fmt::Display + Into<StartError>,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    match crate::service::retry::until_done(what, shutdown, attempt).await {
        Ok(done) => done.map_err(Into::into),
        Err(abandoned) => Err(StartError::Stopped(abandoned.0)),
    }
}

/// Binds `addr` (port 0 picks a free one); the listener and where it is.
pub async fn bind(addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), StartError> {
    let bound = |source| StartError::Bind { addr, source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(bound)?;
    let local = listener.local_addr().map_err(bound)?;
    Ok((listener, local))
}
