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
pub mod auth;
pub mod decision;
mod flags;
pub mod limits;
mod metrics;
mod purchase;
mod queue;
pub mod recorder;
pub mod refusal;
mod waiters;

pub use decision::PurchaseBody;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flashsale_core::bus::kafka::{self, group, topic};
use flashsale_core::bus::topic_reader::GroupProgress;
use flashsale_core::dynamo::inventory::InventoryStore;
use flashsale_core::dynamo::orders::OrderStore;
use flashsale_core::dynamo::{self, Tables};
use flashsale_core::service::ops;
use flashsale_core::service::problem::Problem;
use flashsale_core::service::settings::{
    DynamoSettings, Env, KafkaSettings, RedisSettings, SettingError,
};
pub use flashsale_core::service::start::StartError;
use flashsale_core::service::start::{bind, wait_for};
use flashsale_core::status::board::StatusBoard;
use flashsale_core::stock::{self, StockStore};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::flags::FlagCopy;
use crate::limits::{GlobalLimiter, Rate, UserLimiter};
use crate::queue::QueueWatch;

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
    /// `FLASHSALE_GATEWAY_REQUEST_TIMEOUT_MS`: a purchase not queued by
    /// then is answered `503` (its produce still runs to its end).
    pub request_timeout: Duration,
    /// `FLASHSALE_GATEWAY_MAX_RPS` / `_BURST`: purchases per second this
    /// instance takes, and how many at once; over it, `503`. 0: no limit.
    pub max_rps: f64,
    pub burst: u32,
    /// `FLASHSALE_GATEWAY_MAX_IN_FLIGHT`: produces waiting for the broker at
    /// once; over it, `503`. Keeps a slow broker from piling up requests.
    pub max_in_flight: usize,
    /// `FLASHSALE_GATEWAY_USER_RPS` / `_USER_BURST`: purchases per second
    /// one buyer may send, and how many at once; over it, `429`. 0: no limit.
    pub user_rps: f64,
    pub user_burst: u32,
    /// `FLASHSALE_GATEWAY_ADMISSION_LEASE_MS`: an admitted purchase no
    /// shop-worker answered within this long stops counting against its
    /// sku's window (its gateway may have died before producing it). By
    /// default `FLASHSALE_MAX_QUEUE_AGE_MS`, the shop-workers' cutoff; the
    /// lease is measured on Redis's clock.
    pub admission_lease: Duration,
    /// `FLASHSALE_GATEWAY_FLAG_REFRESH_MS`: how often the in-memory sku
    /// flags are reread in full, besides following every change as it is
    /// published.
    pub flag_refresh: Duration,
    /// `FLASHSALE_GATEWAY_MAX_WAITERS`: long-polls waiting at once; beyond
    /// it a long-poll is answered `429`.
    pub max_waiters: usize,
    /// `FLASHSALE_GATEWAY_CLOCK_OFFSET_MS`: for tests only, how far this
    /// gateway's clock runs ahead (or, negative, behind) of the others.
    pub clock_offset_ms: i64,
    /// `FLASHSALE_GATEWAY_AUTH_*`: who is buying (see `auth`).
    pub auth: auth::AuthSettings,
    /// `FLASHSALE_GATEWAY_RECORD_FILE`: record every arrival to this trace
    /// file (JSON lines, appended), for `flashsale surge --replay`; unset:
    /// nothing is recorded.
    pub record_file: Option<PathBuf>,
}

impl Config {
    pub fn from_env(env: &Env) -> Result<Self, SettingError> {
        let max_rps = env.get("GATEWAY_MAX_RPS", 10_000.0)?;
        Ok(Self {
            addr: env.get("GATEWAY_ADDR", SocketAddr::from(([127, 0, 0, 1], 8080)))?,
            kafka: KafkaSettings::from_env(env)?,
            redis: RedisSettings::from_env(env)?,
            dynamo: DynamoSettings::from_env(env)?,
            max_body_bytes: env.get("GATEWAY_MAX_BODY_BYTES", 4096)?,
            max_wait: Duration::from_secs(env.get("GATEWAY_MAX_WAIT_S", 30)?),
            request_timeout: env.millis("GATEWAY_REQUEST_TIMEOUT_MS", 3_000)?,
            max_rps,
            burst: env.get(
                "GATEWAY_BURST",
                max_rps.ceil().clamp(1.0, u32::MAX as f64) as u32,
            )?,
            max_in_flight: env.get("GATEWAY_MAX_IN_FLIGHT", 1024)?,
            user_rps: env.get("GATEWAY_USER_RPS", 5.0)?,
            user_burst: env.get("GATEWAY_USER_BURST", 10)?,
            // By default the shop-workers' cutoff: a purchase that old is
            // answered `stale`, never given a unit, so its place is free.
            admission_lease: env.millis(
                "GATEWAY_ADMISSION_LEASE_MS",
                env.get("MAX_QUEUE_AGE_MS", 60_000)?,
            )?,
            flag_refresh: env.millis("GATEWAY_FLAG_REFRESH_MS", 1_000)?,
            max_waiters: env.get("GATEWAY_MAX_WAITERS", 10_000)?,
            clock_offset_ms: env.get("GATEWAY_CLOCK_OFFSET_MS", 0)?,
            auth: auth::AuthSettings::from_env(env)?,
            record_file: env.optional("GATEWAY_RECORD_FILE").map(PathBuf::from),
        })
    }
}

pub(crate) struct Gateway {
    pub stock: StockStore,
    pub board: StatusBoard,
    pub orders: OrderStore,
    /// Sales as DynamoDB holds them: what tells a sku Redis lost from one
    /// never sold.
    pub inventory: InventoryStore,
    /// Replaced when it fails fatally (`RenewableProducer::keep_renewed`).
    pub producer: Arc<kafka::RenewableProducer>,
    pub purchase_topic: String,
    pub produce_timeout: Duration,
    pub max_wait: Duration,
    pub request_timeout: Duration,
    pub metrics: metrics::Metrics,
    pub flags: Arc<FlagCopy>,
    pub users: UserLimiter,
    pub global: GlobalLimiter,
    pub in_flight: Arc<Semaphore>,
    pub admission_lease_ms: u64,
    /// An admitted purchase older than this with no status was abandoned by
    /// the instance that admitted it: its produce cannot still be running.
    pub abandoned_after_ms: u64,
    pub queue: QueueWatch,
    pub waiters: Arc<waiters::Waiters>,
    pub clock_offset_ms: i64,
    /// None: the body's `user_id` is the buyer (authentication is off).
    pub auth: Option<auth::Authenticator>,
    /// Where arrivals are recorded, if they are (`recorder`).
    pub recorder: Option<recorder::Recorder>,
}

impl Gateway {
    /// This gateway's clock (see `Config::clock_offset_ms`).
    pub fn now_ms(&self) -> u64 {
        flashsale_core::clock::now_ms().saturating_add_signed(self.clock_offset_ms)
    }

    /// Counts a refusal by reason and passes it on.
    pub fn shed(&self, reason: &str, problem: Problem) -> Problem {
        self.metrics.shed.with_label_values(&[reason]).inc();
        problem
    }
}

#[derive(Debug)]
pub struct RunningGateway {
    pub local_addr: SocketAddr,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Binds `config.addr` (port 0 picks a free one) and serves until `shutdown`.
pub async fn start(
    config: Config,
    shutdown: CancellationToken,
) -> Result<RunningGateway, StartError> {
    let app = app(&config, shutdown.clone()).await?;
    let (listener, local_addr) = bind(config.addr).await?;
    tracing::info!(%local_addr, "gateway listening");
    Ok(RunningGateway {
        local_addr,
        task: tokio::spawn(ops::serve(listener, app, shutdown)),
    })
}

/// The gateway's whole HTTP application (the purchase API and `/healthz`,
/// `/readyz`, `/metrics`), connected to its stores, with its background
/// tasks running until `shutdown`; what `start` serves, and what tests
/// drive in process.
pub async fn app(config: &Config, shutdown: CancellationToken) -> Result<axum::Router, StartError> {
    // First: a key that cannot be used stops the start before any connection.
    let auth = auth::Authenticator::from_settings(&config.auth)
        .map_err(|e| StartError::Setup(format!("buyers' tokens: {e}")))?;
    wait_for("the topics", &shutdown, || {
        kafka::ensure_topics(&config.kafka)
    })
    .await?;
    let conn = wait_for("Redis", &shutdown, || stock::connect(&config.redis)).await?;
    let registry = prometheus::Registry::new();
    let purchase_topic = config.kafka.topic(topic::PURCHASE_REQUESTS);
    let metrics = metrics::Metrics::register(&registry)?;
    let stock = StockStore::new(conn.clone(), &config.redis);
    let flags = Arc::new(FlagCopy::default());
    let dynamo = dynamo::client(&config.dynamo).await;
    let tables = Tables::new(&config.dynamo);
    let waiters = waiters::Waiters::new(config.max_waiters, metrics.long_polls.clone());
    tokio::spawn(flags::follow(
        flags.clone(),
        waiters.clone(),
        stock.clone(),
        config.redis.clone(),
        config.flag_refresh,
        metrics.clone(),
        shutdown.clone(),
    ));
    let recorder = match &config.record_file {
        Some(path) => Some(
            recorder::Recorder::open(path, metrics.trace_dropped.clone()).map_err(|e| {
                StartError::Setup(format!("opening the trace file {}: {e}", path.display()))
            })?,
        ),
        None => None,
    };
    if let Some(recorder) = &recorder {
        recorder.flush_on(shutdown.clone());
    }
    let gateway = Arc::new(Gateway {
        recorder,
        stock,
        board: StatusBoard::new(conn, &config.redis),
        orders: OrderStore::new(dynamo.clone(), &tables),
        inventory: InventoryStore::new(dynamo, &tables),
        producer: Arc::new(kafka::RenewableProducer::new(&config.kafka)?),
        queue: QueueWatch::new(GroupProgress::new(
            &config.kafka,
            &config.kafka.group(group::SHOP),
            &purchase_topic,
        )?),
        purchase_topic,
        produce_timeout: config.kafka.produce_timeout,
        max_wait: config.max_wait,
        request_timeout: config.request_timeout,
        metrics,
        flags,
        users: UserLimiter::new(Rate::new(config.user_rps, config.user_burst)),
        global: GlobalLimiter::new(Rate::new(config.max_rps, config.burst)),
        in_flight: Arc::new(Semaphore::new(config.max_in_flight.max(1))),
        admission_lease_ms: config.admission_lease.as_millis() as u64,
        clock_offset_ms: config.clock_offset_ms,
        auth,
        waiters,
        abandoned_after_ms: (config.kafka.produce_timeout + Duration::from_secs(1)).as_millis()
            as u64,
    });
    tokio::spawn(forget_full_buckets(gateway.clone(), shutdown.clone()));
    tokio::spawn(
        gateway
            .producer
            .clone()
            .keep_renewed(gateway.metrics.producer_renewals.clone(), shutdown.clone()),
    );
    let ready = ops::kafka_and_redis_ready(
        gateway.producer.clone(),
        gateway.purchase_topic.clone(),
        gateway.stock.clone(),
    );
    Ok(api::router(gateway, config.max_body_bytes).merge(ops::router(registry, ready)))
}

/// Keeps the per-buyer buckets to the buyers seen lately.
async fn forget_full_buckets(gateway: Arc<Gateway>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {
                let left = gateway.users.prune();
                gateway.metrics.limited_users.set(left as i64);
            }
        }
    }
}
