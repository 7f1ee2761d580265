//! gateway: the HTTP front door of a flash sale.
//!
//! It checks each purchase (shape, sku, quantity, idempotency key), answers
//! a sold-out sku with `409` without touching Kafka, and queues the rest on
//! `purchase-requests` (key = sku), answering `202` only once the broker has
//! acknowledged the record. It never talks to DynamoDB on the purchase path:
//! what a buyer reads back comes from the status board in Redis, and only a
//! purchase the board has forgotten (older than the retention) is looked up
//! in the `orders` table.

mod api;
mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use flashsale_core::dynamo::{self, Tables};
use flashsale_core::kafka::{self, KafkaFailure, topic};
use flashsale_core::ops;
use flashsale_core::orders::OrderStore;
use flashsale_core::settings::{DynamoSettings, Env, KafkaSettings, RedisSettings, SettingError};
use flashsale_core::status_board::StatusBoard;
use flashsale_core::stock::{self, StockError, StockStore};
use rdkafka::producer::FutureProducer;
use tokio_util::sync::CancellationToken;

/// Settings of one gateway instance.
#[derive(Debug, Clone)]
pub struct Config {
    /// `FLASHSALE_GATEWAY_ADDR`: where buyers reach it.
    pub addr: SocketAddr,
    pub kafka: KafkaSettings,
    pub redis: RedisSettings,
    /// Read only for the status of purchases the status board has forgotten.
    pub dynamo: DynamoSettings,
    /// `FLASHSALE_GATEWAY_MAX_BODY_BYTES`: larger bodies get `413`.
    pub max_body_bytes: usize,
    /// `FLASHSALE_GATEWAY_MAX_WAIT_S`: the longest `?wait=` long-poll.
    pub max_wait: Duration,
}

impl Config {
    pub fn from_env(env: &Env) -> Result<Self, SettingError> {
        Ok(Self {
            addr: env.get("GATEWAY_ADDR", SocketAddr::from(([127, 0, 0, 1], 8080)))?,
            kafka: KafkaSettings::from_env(env)?,
            redis: RedisSettings::from_env(env)?,
            dynamo: DynamoSettings::from_env(env)?,
            max_body_bytes: env.get("GATEWAY_MAX_BODY_BYTES", 4096)?,
            max_wait: Duration::from_secs(env.get("GATEWAY_MAX_WAIT_S", 30)?),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Kafka(#[from] KafkaFailure),
    #[error("connecting to Redis: {0}")]
    Redis(#[from] StockError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

pub(crate) struct Gateway {
    pub stock: StockStore,
    pub board: StatusBoard,
    pub orders: OrderStore,
    pub producer: FutureProducer,
    pub purchase_topic: String,
    pub produce_timeout: Duration,
    pub max_wait: Duration,
    pub metrics: metrics::Metrics,
}

pub struct RunningGateway {
    pub local_addr: SocketAddr,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Binds `config.addr` (port 0 picks a free one) and serves until `shutdown`.
pub async fn start(
    config: Config,
    shutdown: CancellationToken,
) -> Result<RunningGateway, StartError> {
    kafka::ensure_topics(&config.kafka).await?;
    let conn = stock::connect(&config.redis).await?;
    let registry = prometheus::Registry::new();
    let gateway = Arc::new(Gateway {
        stock: StockStore::new(conn.clone(), &config.redis),
        board: StatusBoard::new(conn, &config.redis),
        orders: OrderStore::new(
            dynamo::client(&config.dynamo).await,
            &Tables::new(&config.dynamo),
        ),
        producer: kafka::producer(&config.kafka)?,
        purchase_topic: config.kafka.topic(topic::PURCHASE_REQUESTS),
        produce_timeout: config.kafka.produce_timeout,
        max_wait: config.max_wait,
        metrics: metrics::Metrics::register(&registry)?,
    });
    let ready = ops::kafka_and_redis_ready(
        gateway.producer.clone(),
        gateway.purchase_topic.clone(),
        gateway.stock.clone(),
    );
    let app = api::router(gateway, config.max_body_bytes).merge(ops::router(registry, ready));
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.addr,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.addr,
        source,
    })?;
    tracing::info!(%local_addr, "gateway listening");
    Ok(RunningGateway {
        local_addr,
        task: tokio::spawn(ops::serve(listener, app, shutdown)),
    })
}
