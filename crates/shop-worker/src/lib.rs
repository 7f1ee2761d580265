//! shop-worker: the only writer of stock in Redis.
//!
//! It consumes `purchase-requests` (reserve, then publish the reservation)
//! and `stock-releases` (give units back). A purchase request is reserved in
//! arrival order within its partition (first come, first served); publishing
//! the reservation and posting the status happen concurrently afterwards,
//! and the offset is committed only once both are durable. Every Redis
//! change is an idempotent Lua script, so a redelivered message (after a
//! crash or a rebalance) changes nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use flashsale_core::bus::consumer::{self, ConsumerOptions};
use flashsale_core::bus::consumer_health::ConsumerHealth;
use flashsale_core::bus::kafka::{self, topic};
use flashsale_core::service::metrics::Registrar;
use flashsale_core::service::settings::{Env, KafkaSettings, RedisSettings, SettingError};
use flashsale_core::service::start::{StartError, wait_for};
use flashsale_core::service::worker::{self, RunningWorker, WorkerParts};
use flashsale_core::status::board::StatusBoard;
use flashsale_core::stock::herald::Herald;
use flashsale_core::stock::{self, StockStore};
use flashsale_core::{service::ops, service::retry};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Registry};
use tokio_util::sync::CancellationToken;

/// How long a stopping shop-worker lets its in-flight publications finish
/// before it commits and leaves its group.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of one shop-worker.
#[derive(Debug, Clone)]
pub struct Config {
    pub kafka: KafkaSettings,
    pub redis: RedisSettings,
    /// `FLASHSALE_SHOP_METRICS_ADDR`: `/healthz`, `/readyz`, `/metrics`.
    pub metrics_addr: SocketAddr,
    /// `FLASHSALE_MAX_QUEUE_AGE_MS`: a request that waited longer than this
    /// in Kafka is rejected as `stale` (its buyer has long given up).
    pub max_queue_age: Duration,
    /// `FLASHSALE_SHOP_MAX_IN_FLIGHT`: messages past their reservation
    /// whose publication may be outstanding at once.
    pub max_in_flight: usize,
    /// `FLASHSALE_EXPIRY_SWEEP_MS`: pause between two expiry sweeps over
    /// every sale; a reservation is released at most this long after its
    /// deadline (plus the sweep itself).
    pub sweep_interval: Duration,
    /// `FLASHSALE_EXPIRY_BATCH`: reservations one `expire` call releases at
    /// most, so a sweep never blocks Redis for long.
    pub sweep_batch: usize,
    /// `FLASHSALE_LINE_PATIENCE_MS`: a buyer waiting in a sku's line who
    /// has not asked for their purchase (`GET /v1/purchases/{id}`) for
    /// this long is taken to have left: the line forgets them (`rejected`,
    /// `stale`). Counted from the opening for buyers who came early.
    pub line_patience: Duration,
    /// `FLASHSALE_CONSUMER_STALL_MS`: how long the worker may hold
    /// partitions that deliver nothing, or sit out of its group, while
    /// records wait, before it joins its group again with a new consumer.
    pub stall_after: Duration,
    /// `FLASHSALE_RETRY_DEADLINE_MS`: how long a reservation or release
    /// retries Redis before its message is parked at the tail of its topic
    /// and the worker moves on.
    pub give_up_after: Duration,
}

impl Config {
    pub fn from_env(env: &Env) -> Result<Self, SettingError> {
        Ok(Self {
            kafka: KafkaSettings::from_env(env)?,
            redis: RedisSettings::from_env(env)?,
            metrics_addr: env.get(
                "SHOP_METRICS_ADDR",
                SocketAddr::from(([127, 0, 0, 1], 9101)),
            )?,
            max_queue_age: env.millis("MAX_QUEUE_AGE_MS", 60_000)?,
            max_in_flight: env.get("SHOP_MAX_IN_FLIGHT", 512)?,
            sweep_interval: env.millis("EXPIRY_SWEEP_MS", 1_000)?,
            sweep_batch: env.get("EXPIRY_BATCH", 256)?,
            line_patience: env.millis("LINE_PATIENCE_MS", 60_000)?,
            stall_after: consumer::stall_after(env)?,
            give_up_after: retry::deadline_after(env)?,
        })
    }

    /// The consumer group the worker joins and the topics it reads, the
    /// purchases first: what an autoscaler reads the lag of (`infra/k8s`,
    /// checked against this by `crates/testkit/tests/k8s.rs`).
    pub fn subscription(&self) -> (String, Vec<String>) {
        (
            self.kafka.group(kafka::group::SHOP),
            vec![
                self.kafka.topic(topic::PURCHASE_REQUESTS),
                self.kafka.topic(topic::STOCK_RELEASES),
            ],
        )
    }
}

#[derive(Clone)]
struct Metrics {
    reservations: IntCounterVec,
    releases: IntCounterVec,
    dead_letters: IntCounterVec,
    parked: IntCounterVec,
    expired: IntCounter,
    line: IntCounterVec,
    awaiting_stock: IntGauge,
    producer_renewals: IntGauge,
}

impl Metrics {
    /// `topics`: those the worker reads, whose messages it may set aside.
    fn register(registry: &Registry, topics: &[String]) -> Result<Self, prometheus::Error> {
        let make = Registrar::new(registry);
        Ok(Self {
            reservations: make.counters(
                "shop_reserve_total",
                "Purchase requests by reservation outcome",
                &["outcome"],
            )?,
            releases: make.counters(
                "shop_release_total",
                "Stock releases by outcome",
                &["outcome"],
            )?,
            dead_letters: make.counters_from_zero(
                "shop_dead_letters_total",
                "Messages sent to a DLQ",
                "topic",
                topics,
            )?,
            parked: make.counters_from_zero(
                "shop_parked_total",
                "Messages put back at the tail of their topic: Redis kept failing for them \
                 past FLASHSALE_RETRY_DEADLINE_MS",
                "topic",
                topics,
            )?,
            line: make.counters(
                "shop_line_decided_total",
                "Buyers in a sku's line decided by a script: served, or why turned away",
                &["outcome"],
            )?,
            producer_renewals: make.gauge(
                "shop_producer_renewals",
                "Kafka producers replaced after a fatal error",
            )?,
            awaiting_stock: make.gauge(
                "shop_purchases_awaiting_stock",
                "Purchases of skus whose stock Redis lost, waiting for their recovery",
            )?,
            expired: make.counter(
                "shop_expired_total",
                "Reservations released by the expiry sweep",
            )?,
        })
    }
}

mod handler;
mod sweep;

use handler::{LostSkus, ShopHandler};

struct Shop {
    stock: StockStore,
    /// Tells buyers what the scripts decided, this message's and the line's.
    herald: Herald,
    producer: Arc<kafka::RenewableProducer>,
    purchase_topic: String,
    release_topic: String,
    max_queue_age_ms: u64,
    line_patience_ms: u64,
    lost: LostSkus,
    produce_timeout: Duration,
    give_up_after: Duration,
    metrics: Metrics,
    shutdown: CancellationToken,
}

/// Connects, creates the topics if needed, joins the consumer group and
/// runs until `shutdown`; the returned task ends once the worker has
/// committed its offsets and left the group.
pub async fn start(
    config: Config,
    shutdown: CancellationToken,
) -> Result<RunningWorker, StartError> {
    wait_for("the topics", &shutdown, || {
        kafka::ensure_topics(&config.kafka)
    })
    .await?;
    let conn = wait_for("Redis", &shutdown, || stock::connect(&config.redis)).await?;
    let producer = Arc::new(kafka::RenewableProducer::new(&config.kafka)?);
    let (group, topics) = config.subscription();
    let registry = Registry::new();
    let metrics = Metrics::register(&registry, &topics)?;
    let stock = StockStore::new(conn.clone(), &config.redis);
    let shop = Arc::new(Shop {
        herald: Herald::new(
            stock.clone(),
            StatusBoard::new(conn, &config.redis),
            producer.clone(),
            &config.kafka,
            config.give_up_after,
        ),
        stock,
        producer: producer.clone(),
        purchase_topic: config.kafka.topic(topic::PURCHASE_REQUESTS),
        release_topic: config.kafka.topic(topic::STOCK_RELEASES),
        max_queue_age_ms: config.max_queue_age.as_millis() as u64,
        line_patience_ms: config.line_patience.as_millis() as u64,
        lost: LostSkus::default(),
        produce_timeout: config.kafka.produce_timeout,
        give_up_after: config.give_up_after,
        metrics,
        shutdown: shutdown.clone(),
    });
    let consumer = ConsumerOptions {
        kafka: config.kafka.clone(),
        stall_after: config.stall_after,
        health: ConsumerHealth::register(&registry)?,
        group,
        topics,
        max_in_flight: config.max_in_flight,
        drain_timeout: DRAIN_TIMEOUT,
        pause: None,
    };
    let progress = Arc::new(sweep::SweepProgress::new(config.sweep_interval));
    let stores_ready = ops::kafka_and_redis_ready(
        shop.producer.clone(),
        shop.purchase_topic.clone(),
        shop.stock.clone(),
    );
    // Ready only while the sweep keeps up, too.
    let ready: ops::ReadinessCheck = {
        let progress = progress.clone();
        Arc::new(move || {
            let (stores_ready, progress) = (stores_ready.clone(), progress.clone());
            Box::pin(async move {
                let summary = stores_ready().await?;
                match progress.problem() {
                    None => Ok(summary),
                    Some(problem) => Err(problem),
                }
            })
        })
    };
    let sweeper = tokio::spawn(sweep::run(
        shop.clone(),
        config.sweep_interval,
        config.sweep_batch,
        progress,
    ));
    worker::start(
        WorkerParts {
            name: "shop-worker",
            consumer,
            metrics_addr: config.metrics_addr,
            registry,
            ready,
            producer: shop.producer.clone(),
            producer_renewals: shop.metrics.producer_renewals.clone(),
            redis: shop.stock.connection().clone(),
            background: vec![sweeper],
            handler: ShopHandler(shop),
        },
        shutdown,
    )
    .await
}
