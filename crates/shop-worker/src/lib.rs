//! shop-worker: the only writer of stock in Redis.
//!
//! It consumes `purchase-requests` (reserve, then publish the reservation)
//! and `stock-releases` (give units back). A purchase request is reserved in
//! arrival order within its partition (first come, first served); publishing
//! the reservation and posting the status happen concurrently afterwards,
//! and the offset is committed only once both are durable. Every Redis
//! change is an idempotent Lua script, so a redelivered message (after a
//! crash or a rebalance) changes nothing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use flashsale_core::bus::consumer::{self, Abandoned, Completion, ConsumerOptions, Handler};
use flashsale_core::bus::consumer_health::ConsumerHealth;
use flashsale_core::bus::kafka::{self, Aside, KafkaFailure, topic};
use flashsale_core::bus::members::Membership;
use flashsale_core::bus::messages::{self, PurchaseRequest, StockRelease};
use flashsale_core::ids::Sku;
use flashsale_core::service::retry::Stop;
use flashsale_core::service::settings::{Env, KafkaSettings, RedisSettings, SettingError};
use flashsale_core::status::board::{StatusBoard, Subject};
use flashsale_core::status::{PurchaseState, reason};
use flashsale_core::stock::herald::Herald;
use flashsale_core::stock::{
    self, Announcement, Answered, ReleaseOutcome, ReserveOutcome, StockError, StockStore,
};
use flashsale_core::{clock, service::ops, service::retry};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use rdkafka::message::{Message, OwnedMessage};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

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
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Kafka(#[from] KafkaFailure),
    #[error("connecting to Redis: {0}")]
    Redis(#[from] stock::StockError),
    #[error("binding the metrics address: {0}")]
    Bind(#[from] std::io::Error),
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
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
    fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let counter =
            |name: &str, help: &str, label: &str| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), &[label])?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        Ok(Self {
            reservations: counter(
                "shop_reserve_total",
                "Purchase requests by reservation outcome",
                "outcome",
            )?,
            releases: counter("shop_release_total", "Stock releases by outcome", "outcome")?,
            dead_letters: counter("shop_dead_letters_total", "Messages sent to a DLQ", "topic")?,
            parked: counter(
                "shop_parked_total",
                "Messages put back at the tail of their topic: Redis kept failing for them \
                 past FLASHSALE_RETRY_DEADLINE_MS",
                "topic",
            )?,
            line: counter(
                "shop_line_decided_total",
                "Buyers in a sku's line decided by a script: served, or why turned away",
                "outcome",
            )?,
            producer_renewals: {
                let g = IntGauge::new(
                    "shop_producer_renewals",
                    "Kafka producers replaced after a fatal error",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            awaiting_stock: {
                let g = IntGauge::new(
                    "shop_purchases_awaiting_stock",
                    "Purchases of skus whose stock Redis lost, waiting for their recovery",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            expired: {
                let c = IntCounter::new(
                    "shop_expired_total",
                    "Reservations released by the expiry sweep",
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
        })
    }
}

mod sweep;

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

/// The skus whose stock Redis lost, each with the gate its purchases pass
/// in arrival order once it is recovered.
#[derive(Default)]
struct LostSkus {
    gates: std::sync::Mutex<HashMap<Sku, Arc<tokio::sync::Mutex<()>>>>,
}

impl LostSkus {
    fn gate(&self, sku: &Sku) -> Arc<tokio::sync::Mutex<()>> {
        let mut gates = self.gates.lock().unwrap_or_else(|e| e.into_inner());
        // A gate nobody holds or waits at is of a sku recovered since.
        gates.retain(|_, gate| Arc::strong_count(gate) > 1);
        gates
            .entry(sku.clone())
            .or_insert_with(|| {
                tracing::error!(%sku, "Redis holds no stock for this sku: its purchases wait for `flashsale recover --sku {sku}`; the other skus go on");
                Arc::default()
            })
            .clone()
    }
}

/// Counts one in a gauge for as long as it lives.
struct Counted(IntGauge);

impl Counted {
    fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A running shop-worker.
pub struct ShopWorker {
    pub metrics_addr: SocketAddr,
    /// Ends when the worker has left its group: `Err` if it stopped because
    /// a message could not be processed (its offset stays uncommitted).
    pub task: tokio::task::JoinHandle<Result<(), Abandoned>>,
}

/// Connects, creates the topics if needed, joins the consumer group and
/// runs until `shutdown`; the returned task ends once the worker has
/// committed its offsets and left the group.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<ShopWorker, StartError> {
    kafka::ensure_topics(&config.kafka).await?;
    let conn = stock::connect(&config.redis).await?;
    let producer = Arc::new(kafka::RenewableProducer::new(&config.kafka)?);
    let registry = Registry::new();
    let metrics = Metrics::register(&registry)?;
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
    let options = ConsumerOptions {
        kafka: config.kafka.clone(),
        stall_after: config.stall_after,
        health: ConsumerHealth::register(&registry)?,
        group: config.kafka.group(kafka::group::SHOP),
        topics: vec![shop.purchase_topic.clone(), shop.release_topic.clone()],
        max_in_flight: config.max_in_flight,
        drain_timeout: Duration::from_secs(10),
        pause: None,
    };
    let consumer = consumer::consumer(&options)?;

    let listener = tokio::net::TcpListener::bind(config.metrics_addr).await?;
    let metrics_addr = listener.local_addr()?;
    let progress = Arc::new(sweep::SweepProgress::new(config.sweep_interval));
    let stores_ready = ops::kafka_and_redis_ready(
        shop.producer.clone(),
        shop.purchase_topic.clone(),
        shop.stock.clone(),
    );
    let sweep_ready: ops::ReadinessCheck = {
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
    let app = ops::router(
        registry,
        ops::with_consumer(sweep_ready, options.health.clone()),
    );
    let ops_shutdown = shutdown.clone();
    let ops_task = tokio::spawn(ops::serve(listener, app, ops_shutdown));
    tracing::info!(%metrics_addr, group = %options.group, "shop-worker started");
    tokio::spawn(
        shop.producer
            .clone()
            .keep_renewed(shop.metrics.producer_renewals.clone(), shutdown.clone()),
    );
    let sweeper = tokio::spawn(sweep::run(
        shop.clone(),
        config.sweep_interval,
        config.sweep_batch,
        progress,
    ));
    let membership = tokio::spawn(
        Membership::new(
            shop.stock.connection().clone(),
            &options.group,
            "shop-worker",
        )
        .run(shutdown.clone()),
    );
    let task = tokio::spawn(async move {
        let stopped = consumer::run(consumer, ShopHandler(shop), &options, shutdown.clone()).await;
        // The worker is of no use any more: stop answering probes too.
        shutdown.cancel();
        let _ = sweeper.await;
        let _ = ops_task.await;
        let _ = membership.await;
        stopped
    });
    Ok(ShopWorker { metrics_addr, task })
}

struct ShopHandler(Arc<Shop>);

impl Handler for ShopHandler {
    async fn start(&self, message: OwnedMessage) -> Result<Completion, Abandoned> {
        let shop = self.0.clone();
        if message.topic() == shop.release_topic {
            shop.release(message).await
        } else {
            shop.reserve(message).await
        }
    }
}

impl Shop {
    async fn reserve(self: Arc<Self>, message: OwnedMessage) -> Result<Completion, Abandoned> {
        let request: PurchaseRequest = match messages::decode(message.payload()) {
            Ok(request) => request,
            Err(error) => {
                return self
                    .set_aside(message, error.to_string(), Aside::DeadLetter)
                    .await;
            }
        };
        let span =
            tracing::info_span!("reserve", request_id = %request.request_id, sku = %request.sku);
        // A script answer we do not understand is a bug, not bad input:
        // stop rather than guess and move stock. A Redis that keeps failing
        // (this sku's node of a cluster down, writes refused) parks the
        // purchase rather than holding every purchase behind it.
        // A sku whose stock Redis lost answers `None`: its purchase waits
        // for the recovery apart (`await_recovery`), and the purchases of
        // every other sku go on behind it.
        let answered =
            match retry::durable_until("reserve", &self.shutdown, self.deadline(), || {
                self.reserve_loaded(&request)
            })
            .instrument(span.clone())
            .await
            {
                Ok(Some(answered)) => answered,
                Ok(None) => {
                    return Ok(Box::pin(
                        self.await_recovery(message, request).instrument(span),
                    ));
                }
                Err(Stop::Abandoned(abandoned)) => return Err(abandoned),
                Err(Stop::GaveUp(why)) => return self.set_aside(message, why, Aside::Park).await,
            };
        Ok(Box::pin(
            self.tell(message, request, answered).instrument(span),
        ))
    }

    /// One reserve call; `None` when Redis holds no stock for the sku.
    async fn reserve_loaded(
        &self,
        request: &PurchaseRequest,
    ) -> Result<Option<Answered<ReserveOutcome>>, StockError> {
        loaded(
            self.stock
                .reserve(request, clock::now_ms(), self.max_queue_age_ms),
        )
        .await
    }

    /// Tells the buyer (and the line) what the reserve script decided.
    async fn tell(
        self: Arc<Self>,
        message: OwnedMessage,
        request: PurchaseRequest,
        answered: Answered<ReserveOutcome>,
    ) -> Result<(), Abandoned> {
        let label = answered.outcome.label();
        self.metrics.reservations.with_label_values(&[label]).inc();
        tracing::debug!(outcome = label, decided = answered.line.len(), "reserve");
        let mine = self.herald.tell(
            &request.sku,
            request.request_id,
            &request.user_id,
            request.quantity,
            &answered.outcome,
            &self.shutdown,
        );
        let line = self.tell_line(&request.sku, &answered.line);
        let told = tokio::try_join!(mine, line).map(|_| ());
        self.parked_if_given_up(message, told).await
    }

    /// A purchase of a sku whose stock Redis lost waits for
    /// `flashsale recover --sku`, behind the earlier purchases of the same
    /// sku (arrival order is kept); when it is rebuilt, the purchase is
    /// reserved as if it had just arrived. One that outwaits the queue
    /// cutoff first is rejected `stale`, as it would be after the recovery.
    async fn await_recovery(
        self: Arc<Self>,
        message: OwnedMessage,
        request: PurchaseRequest,
    ) -> Result<(), Abandoned> {
        let _counted = Counted::new(&self.metrics.awaiting_stock);
        let gate = self.lost.gate(&request.sku);
        let _turn = gate.lock().await;
        let mut backoff = retry::Backoff::default();
        loop {
            let age = clock::now_ms().saturating_sub(request.accepted_at_ms);
            if age > self.max_queue_age_ms {
                let subject = Subject {
                    id: request.request_id,
                    sku: &request.sku,
                    user: &request.user_id,
                    quantity: request.quantity,
                };
                self.metrics
                    .reservations
                    .with_label_values(&[reason::STALE])
                    .inc();
                let told = self
                    .post(&subject, PurchaseState::Rejected, Some(reason::STALE))
                    .await;
                return self.parked_if_given_up(message, told).await;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => {
                    return Err(Abandoned("shutting down while a sku waits for its recovery".into()));
                }
                _ = tokio::time::sleep(backoff.next_wait()) => {}
            }
            match self.reserve_loaded(&request).await {
                Ok(Some(answered)) => return self.clone().tell(message, request, answered).await,
                Ok(None) => {}
                Err(error) if error.is_transient() => {
                    tracing::warn!(%error, "reserve failed while the sku waits for its recovery");
                }
                Err(error) => return Err(Abandoned(format!("reserve: {error}"))),
            }
        }
    }

    /// Tells the waiters a script decided for, counted by outcome.
    pub(crate) async fn tell_line(&self, sku: &Sku, line: &[Announcement]) -> Result<(), Stop> {
        for waiter in line {
            // A unit that came back and went to a waiter.
            let label = match &waiter.outcome {
                ReserveOutcome::Reserved { .. } => "served",
                other => other.label(),
            };
            self.metrics.line.with_label_values(&[label]).inc();
        }
        self.herald.announce(sku, line, &self.shutdown).await
    }

    /// Posts a purchase's state once its effect is durable.
    pub(crate) async fn post(
        &self,
        subject: &Subject<'_>,
        state: PurchaseState,
        reason: Option<&str>,
    ) -> Result<(), Stop> {
        self.herald
            .post(subject, state, reason, &self.shutdown)
            .await
    }

    async fn release(self: Arc<Self>, message: OwnedMessage) -> Result<Completion, Abandoned> {
        let release: StockRelease = match messages::decode(message.payload()) {
            Ok(release) => release,
            Err(error) => {
                return self
                    .set_aside(message, error.to_string(), Aside::DeadLetter)
                    .await;
            }
        };
        let released = retry::durable_until("release", &self.shutdown, self.deadline(), || {
            self.stock.release(
                &release.sku,
                release.request_id,
                &release.reason,
                clock::now_ms(),
            )
        })
        .await;
        let Answered { outcome, line } = match released {
            Ok(answered) => answered,
            Err(Stop::Abandoned(abandoned)) => return Err(abandoned),
            Err(Stop::GaveUp(why)) => return self.set_aside(message, why, Aside::Park).await,
        };
        let label = outcome.label();
        self.metrics.releases.with_label_values(&[label]).inc();
        tracing::debug!(request_id = %release.request_id, sku = %release.sku, outcome = %label, reason = %release.reason, "stock release");
        if outcome == ReleaseOutcome::WasCommitted {
            // A sold unit is never given back, and its order is confirmed:
            // a release for it is a bug upstream, not a cancellation.
            tracing::error!(request_id = %release.request_id, "release asked for a committed reservation; ignored");
            return Ok(consumer::done());
        }
        // The units are back (now or by an earlier delivery): only now is
        // the purchase settled as cancelled.
        Ok(Box::pin(async move {
            let subject = Subject {
                id: release.request_id,
                sku: &release.sku,
                user: &release.user_id,
                quantity: release.quantity,
            };
            // The reason of the release that happened first: if the sweep
            // expired the reservation before this release arrived, the buyer
            // is told it expired.
            let reason = match &outcome {
                ReleaseOutcome::Released { reason } => reason.as_str(),
                _ => release.reason.as_str(),
            };
            // The units went to the head of the line: its buyers hear now.
            let cancelled = self.post(&subject, PurchaseState::Cancelled, Some(reason));
            let line = self.tell_line(&release.sku, &line);
            let told = tokio::try_join!(cancelled, line).map(|_| ());
            self.parked_if_given_up(message, told).await
        }))
    }

    /// When a Redis call for this message gives up.
    fn deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.give_up_after
    }

    /// Moves a message out of the way so that its partition goes on: to
    /// its DLQ when it can never be processed, or back to the tail of its
    /// topic when Redis kept failing for it.
    async fn set_aside(
        self: Arc<Self>,
        message: OwnedMessage,
        why: String,
        to: Aside,
    ) -> Result<Completion, Abandoned> {
        let counter = match to {
            Aside::DeadLetter => &self.metrics.dead_letters,
            Aside::Park => &self.metrics.parked,
        };
        counter.with_label_values(&[message.topic()]).inc();
        Ok(Box::pin(async move {
            kafka::set_aside(
                &self.producer,
                &message,
                &why,
                to,
                self.produce_timeout,
                &self.shutdown,
            )
            .await
        }))
    }

    /// The end of a message's work. When a store kept failing past its
    /// deadline, the message goes back to the tail of its topic and its
    /// partition moves on: processing is idempotent by request id, so the
    /// copy resumes where Redis says the purchase stopped.
    async fn parked_if_given_up(
        &self,
        message: OwnedMessage,
        work: Result<(), Stop>,
    ) -> Result<(), Abandoned> {
        match work {
            Ok(()) => Ok(()),
            Err(Stop::Abandoned(abandoned)) => Err(abandoned),
            Err(Stop::GaveUp(why)) => {
                self.metrics
                    .parked
                    .with_label_values(&[message.topic()])
                    .inc();
                kafka::set_aside(
                    &self.producer,
                    &message,
                    &why,
                    Aside::Park,
                    self.produce_timeout,
                    &self.shutdown,
                )
                .await
            }
        }
    }
}

/// A stock call's answer; `None` when Redis holds no stock for the sku.
pub(crate) async fn loaded<T>(
    call: impl std::future::Future<Output = Result<T, StockError>>,
) -> Result<Option<T>, StockError> {
    match call.await {
        Err(StockError::Unloaded(_)) => Ok(None),
        answered => answered.map(Some),
    }
}
