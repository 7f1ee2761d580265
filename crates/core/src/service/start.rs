//! What every service's start can fail on, and the one way a service binds
//! its listening address.

use std::net::SocketAddr;

use crate::bus::kafka::KafkaFailure;
use crate::dynamo::DynamoError;
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
}

/// Binds `addr` (port 0 picks a free one); the listener and where it is.
pub async fn bind(addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), StartError> {
    let bound = |source| StartError::Bind { addr, source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(bound)?;
    let local = listener.local_addr().map_err(bound)?;
    Ok((listener, local))
}
