//! order-worker: turns reservations into orders.
//!
//! Consumes `reservations` (consumer group `flashsale-orders`) and runs the
//! saga in `saga` for each, many at once: reservations are independent of
//! each other, and the consumer loop commits an offset only when every
//! reservation before it in the partition has reached a terminal state.

mod breaker;
mod saga;

pub use saga::CrashPoint;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use flashsale_core::bus::consumer::{self, Abandoned, Completion, ConsumerOptions, Handler};
use flashsale_core::bus::consumer_health::ConsumerHealth;
use flashsale_core::bus::kafka::{self, Aside, topic};
use flashsale_core::bus::messages::{self, Reservation};
use flashsale_core::dynamo::orders::OrderStore;
use flashsale_core::dynamo::{self, Tables};
use flashsale_core::payment::PaymentClient;
use flashsale_core::service::metrics::Registrar;
use flashsale_core::service::retry::Stop;
use flashsale_core::service::settings::{
    self, DynamoSettings, Env, KafkaSettings, RedisSettings, SettingError,
};
use flashsale_core::service::start::{StartError, wait_for};
use flashsale_core::service::worker::{self, RunningWorker, WorkerParts};
use flashsale_core::status::board::StatusBoard;
use flashsale_core::stock::herald::Herald;
use flashsale_core::stock::{self, StockStore};
use flashsale_core::{service::ops, service::retry};
use prometheus::{HistogramVec, IntCounter, IntCounterVec, IntGauge, Registry};
use rdkafka::message::{Message, OwnedMessage};
use tokio_util::sync::CancellationToken;

/// How long a stopping order-worker lets its sagas in flight finish (a
/// charge may wait on the processor) before it commits and leaves its group.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings of one order-worker.
#[derive(Debug, Clone)]
pub struct Config {
    pub kafka: KafkaSettings,
    pub redis: RedisSettings,
    pub dynamo: DynamoSettings,
    /// `FLASHSALE_PAYMENT_URL`.
    pub payment_url: String,
    /// `FLASHSALE_PAYMENT_TIMEOUT_MS`: a charge not answered by then is
    /// retried with the same idempotency key.
    pub payment_timeout: Duration,
    /// `FLASHSALE_CURRENCY`: ISO code the charges are made in.
    pub currency: String,
    /// `FLASHSALE_ORDER_METRICS_ADDR`: `/healthz`, `/readyz`, `/metrics`.
    pub metrics_addr: SocketAddr,
    /// `FLASHSALE_ORDER_CONCURRENCY`: sagas in progress at once.
    pub concurrency: usize,
    /// `FLASHSALE_CONSUMER_STALL_MS`: how long the worker may hold
    /// partitions that deliver nothing, or sit out of its group, while
    /// reservations wait, before it joins its group again with a new consumer.
    pub stall_after: Duration,
    /// `FLASHSALE_PAYMENT_BREAKER_FAILURES`: unanswered payment calls in a
    /// row that open the breaker.
    pub breaker_failures: u32,
    /// `FLASHSALE_PAYMENT_BREAKER_OPEN_MS`: how long it stays open before
    /// one probe is let through.
    pub breaker_open_for: Duration,
    /// `FLASHSALE_ORDER_CRASH_AFTER` (`put`, `charge` or `commit`): for the
    /// kill tests only, the process aborts at that saga step.
    pub crash_after: Option<CrashPoint>,
    /// `FLASHSALE_ORDER_CLOCK_OFFSET_MS`: for tests only, how far this
    /// worker's clock runs ahead (or, negative, behind) of the others, as
    /// a badly synchronised machine's would.
    pub clock_offset_ms: i64,
    /// `FLASHSALE_ORDER_GROUP`: the consumer group, by default the
    /// deployment's `flashsale-orders`. For tests only: a second group over
    /// the same reservations runs every saga twice at once, as a partition
    /// taken over from a worker that is only slow does.
    pub group: Option<String>,
    /// `FLASHSALE_RETRY_DEADLINE_MS`: how long a saga step retries a store
    /// call or the processor before the purchase takes its failure path
    /// or its reservation is parked at the tail of the topic.
    pub give_up_after: Duration,
}

impl Config {
    pub fn from_env(env: &Env) -> Result<Self, SettingError> {
        Ok(Self {
            kafka: KafkaSettings::from_env(env)?,
            redis: RedisSettings::from_env(env)?,
            dynamo: DynamoSettings::from_env(env)?,
            payment_url: settings::payment_url(env),
            payment_timeout: env.millis("PAYMENT_TIMEOUT_MS", 2_000)?,
            currency: env.string("CURRENCY", "EUR"),
            metrics_addr: env.get(
                "ORDER_METRICS_ADDR",
                SocketAddr::from(([127, 0, 0, 1], 9102)),
            )?,
            concurrency: env.get("ORDER_CONCURRENCY", 64)?,
            stall_after: consumer::stall_after(env)?,
            breaker_failures: env.get("PAYMENT_BREAKER_FAILURES", 5)?,
            breaker_open_for: env.millis("PAYMENT_BREAKER_OPEN_MS", 2_000)?,
            crash_after: match env.string("ORDER_CRASH_AFTER", "").as_str() {
                "" => None,
                _ => Some(env.get("ORDER_CRASH_AFTER", CrashPoint::AfterPut)?),
            },
            clock_offset_ms: env.get("ORDER_CLOCK_OFFSET_MS", 0)?,
            give_up_after: retry::deadline_after(env)?,
            group: env.optional("ORDER_GROUP"),
        })
    }

    /// The consumer group the worker joins and the topics it reads: what
    /// an autoscaler reads the lag of (`infra/k8s`, checked against this
    /// by `crates/testkit/tests/k8s.rs`).
    pub fn subscription(&self) -> (String, Vec<String>) {
        (
            self.group
                .clone()
                .unwrap_or_else(|| self.kafka.group(kafka::group::ORDERS)),
            vec![self.kafka.topic(topic::RESERVATIONS)],
        )
    }
}

#[derive(Clone)]
pub(crate) struct Metrics {
    pub outcomes: IntCounterVec,
    pub dead_letters: IntCounterVec,
    /// Charge calls and lookups, by what came of them.
    pub charges: IntCounterVec,
    pub step_seconds: HistogramVec,
    pub breaker_open: IntGauge,
    /// Requests sent to DynamoDB (retries included), by operation.
    pub dynamodb_requests: IntCounterVec,
    /// Saga passes that left the order PENDING.
    pub stalls: IntCounter,
    /// Reservations put back at the tail of their topic.
    pub parked: IntCounter,
    pub producer_renewals: IntGauge,
}

impl Metrics {
    /// `topics`: those the worker reads, whose messages it may set aside.
    fn register(registry: &Registry, topics: &[String]) -> Result<Self, prometheus::Error> {
        let make = Registrar::new(registry);
        Ok(Self {
            outcomes: make.counters(
                "order_outcomes_total",
                "Sagas finished, by terminal state",
                &["state"],
            )?,
            dead_letters: make.counters_from_zero(
                "order_dead_letters_total",
                "Reservations sent to the DLQ",
                "topic",
                topics,
            )?,
            charges: make.counters(
                "order_charges_total",
                "Charge calls and lookups by outcome (succeeded, declined, refused, \
                 unanswered, found_by_key, expired_uncharged, lookup_failed, given_up, stray_refunded)",
                &["outcome"],
            )?,
            step_seconds: make.histograms(
                "order_step_seconds",
                "Time spent in each saga step",
                &["step"],
                vec![
                    0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ],
            )?,
            breaker_open: make.gauge(
                "order_payment_breaker_open",
                "1 while the payment breaker is open (consumption paused)",
            )?,
            dynamodb_requests: make.counters(
                "order_dynamodb_requests_total",
                "Write requests sent to DynamoDB, retries included (put, confirm, cancel)",
                &["op"],
            )?,
            stalls: make.counter(
                "order_saga_stalls_total",
                "Saga passes that left the order PENDING (a confirm refused, another run of the \
                 purchase not done), each followed by a growing wait; a steady rise needs an operator",
            )?,
            producer_renewals: make.gauge(
                "order_producer_renewals",
                "Kafka producers replaced after a fatal error",
            )?,
            parked: make.counter(
                "order_parked_total",
                "Reservations whose saga gave up on a store or the processor past \
                 FLASHSALE_RETRY_DEADLINE_MS and were put back at the tail of their topic",
            )?,
        })
    }
}

/// What a saga needs.
pub(crate) struct Deps {
    pub orders: OrderStore,
    pub stock: StockStore,
    pub payment: PaymentClient,
    pub producer: Arc<kafka::RenewableProducer>,
    pub release_topic: String,
    pub produce_timeout: Duration,
    /// Posts statuses, and tells the buyers a commit turned away from the
    /// sku's line.
    pub herald: Herald,
    pub currency: String,
    pub metrics: Metrics,
    pub breaker: breaker::Breaker,
    pub crash_after: Option<CrashPoint>,
    pub clock_offset_ms: i64,
    pub give_up_after: Duration,
    pub shutdown: CancellationToken,
}

impl Deps {
    /// Moves a reservation out of its partition's way (`kafka::set_aside`),
    /// counted by where it went.
    async fn set_aside(
        &self,
        message: &OwnedMessage,
        why: &str,
        to: Aside,
    ) -> Result<(), Abandoned> {
        match to {
            Aside::DeadLetter => self
                .metrics
                .dead_letters
                .with_label_values(&[message.topic()])
                .inc(),
            Aside::Park => self.metrics.parked.inc(),
        }
        kafka::set_aside(
            &self.producer,
            message,
            why,
            to,
            self.produce_timeout,
            &self.shutdown,
        )
        .await
    }

    /// This worker's clock (see `Config::clock_offset_ms`).
    pub fn now_ms(&self) -> u64 {
        flashsale_core::clock::now_ms().saturating_add_signed(self.clock_offset_ms)
    }
}

pub async fn start(
    config: Config,
    shutdown: CancellationToken,
) -> Result<RunningWorker, StartError> {
    wait_for("the topics", &shutdown, || {
        kafka::ensure_topics(&config.kafka)
    })
    .await?;
    let client = dynamo::client(&config.dynamo).await;
    let tables = Tables::new(&config.dynamo);
    wait_for("the tables", &shutdown, || {
        dynamo::ensure_tables(&client, &tables)
    })
    .await?;
    let conn = wait_for("Redis", &shutdown, || stock::connect(&config.redis)).await?;
    let (group, topics) = config.subscription();
    let registry = Registry::new();
    let metrics = Metrics::register(&registry, &topics)?;
    let stock = StockStore::new(conn.clone(), &config.redis);
    let producer = Arc::new(kafka::RenewableProducer::new(&config.kafka)?);
    let deps = Arc::new(Deps {
        orders: OrderStore::new(client, &tables),
        herald: Herald::new(
            stock.clone(),
            StatusBoard::new(conn, &config.redis),
            producer.clone(),
            &config.kafka,
            config.give_up_after,
        ),
        stock,
        payment: PaymentClient::new(&config.payment_url, config.payment_timeout),
        producer,
        release_topic: config.kafka.topic(topic::STOCK_RELEASES),
        produce_timeout: config.kafka.produce_timeout,
        currency: config.currency.clone(),
        metrics,
        breaker: breaker::Breaker::new(config.breaker_failures, config.breaker_open_for),
        crash_after: config.crash_after,
        clock_offset_ms: config.clock_offset_ms,
        give_up_after: config.give_up_after,
        shutdown: shutdown.clone(),
    });
    let paused = deps.breaker.watch();
    {
        let (mut open, gauge) = (deps.breaker.watch(), deps.metrics.breaker_open.clone());
        tokio::spawn(async move {
            while open.changed().await.is_ok() {
                gauge.set(i64::from(*open.borrow()));
            }
        });
    }
    let consumer = ConsumerOptions {
        kafka: config.kafka.clone(),
        stall_after: config.stall_after,
        health: ConsumerHealth::register(&registry)?,
        group,
        topics,
        max_in_flight: config.concurrency.max(1),
        drain_timeout: DRAIN_TIMEOUT,
        // While the payment breaker is open, reservations wait in Kafka.
        pause: Some(paused),
    };
    worker::start(
        WorkerParts {
            name: "order-worker",
            consumer,
            metrics_addr: config.metrics_addr,
            registry,
            ready: ops::kafka_and_redis_ready(
                deps.producer.clone(),
                deps.release_topic.clone(),
                deps.stock.clone(),
            ),
            producer: deps.producer.clone(),
            producer_renewals: deps.metrics.producer_renewals.clone(),
            redis: deps.stock.connection().clone(),
            background: Vec::new(),
            handler: OrderHandler(deps),
        },
        shutdown,
    )
    .await
}

struct OrderHandler(Arc<Deps>);

impl Handler for OrderHandler {
    async fn start(&self, message: OwnedMessage) -> Result<Completion, Abandoned> {
        let deps = self.0.clone();
        match messages::decode::<Reservation>(message.payload()) {
            Ok(reservation) => Ok(Box::pin(async move {
                let span = tracing::info_span!(
                    "order",
                    request_id = %reservation.request_id,
                    sku = %reservation.sku,
                    traceparent = kafka::header(&message, kafka::TRACEPARENT).unwrap_or_default()
                );
                let ran =
                    tracing::Instrument::instrument(saga::run(deps.clone(), reservation), span)
                        .await;
                match ran {
                    Ok(()) => Ok(()),
                    Err(Stop::Abandoned(abandoned)) => Err(abandoned),
                    // The partition moves on; the copy resumes the purchase.
                    Err(Stop::GaveUp(why)) => deps.set_aside(&message, &why, Aside::Park).await,
                }
            })),
            Err(error) => {
                let error = error.to_string();
                Ok(Box::pin(async move {
                    deps.set_aside(&message, &error, Aside::DeadLetter).await
                }))
            }
        }
    }
}
