//! Starts a whole flashsale pipeline in-process, against the real local
//! stack (the Kafka, Redis and DynamoDB Local that `./scripts/test` runs),
//! for integration tests.
//!
//! Each pipeline gets its own topic, consumer-group and table prefix, and
//! its services listen on ports the OS picks, so tests run in parallel
//! without seeing each other's data. Sku names are unique per pipeline too,
//! because Redis is shared.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use flashsale_cli::sale::{self, SaleSpec};
use flashsale_cli::{Config as CliConfig, Stores};
use flashsale_core::consume::Abandoned;
use flashsale_core::ids::Sku;
use flashsale_core::kafka::{self, topic};
use flashsale_core::payment::StubBehaviour;
use flashsale_core::settings::{Env, KafkaSettings};
use flashsale_core::stock::SaleRules;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

pub use flashsale_cli;
pub use flashsale_core;

/// The process environment's `FLASHSALE_*` settings (the stack's ports),
/// with `overrides` on top.
pub fn env_with(overrides: &[(&str, String)]) -> Env {
    let mut vars: HashMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("FLASHSALE_"))
        .collect();
    for (k, v) in overrides {
        vars.insert((*k).to_owned(), v.clone());
    }
    Env::from_map(vars)
}

fn any_port() -> String {
    SocketAddr::from(([127, 0, 0, 1], 0)).to_string()
}

#[derive(Debug, Clone)]
pub struct PipelineOptions {
    pub decline_rate: f64,
    pub payment_latency_ms: u64,
    pub shop_workers: usize,
    pub order_workers: usize,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        Self {
            decline_rate: 0.0,
            payment_latency_ms: 5,
            shop_workers: 1,
            order_workers: 1,
        }
    }
}

/// One worker of a pipeline, stoppable on its own (an operator scaling in).
pub struct Worker {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), Abandoned>>,
}

impl Worker {
    /// SIGTERM, in effect: finish in-flight work, commit, leave the group.
    /// `Err` if the worker had stopped on its own before.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        Ok(self.task.await??)
    }
}

pub struct Pipeline {
    /// Unique to this pipeline: the prefix of its topics, groups and tables.
    pub prefix: String,
    pub env: Env,
    pub kafka: KafkaSettings,
    pub cli: CliConfig,
    pub stores: Stores,
    pub gateway_url: String,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Pipeline {
    pub async fn start(options: PipelineOptions) -> anyhow::Result<Self> {
        flashsale_core::ops::init_tracing();
        let id = &uuid::Uuid::now_v7().simple().to_string()[20..];
        let prefix = format!("t{id}");
        let stub_env = env_with(&[
            ("FLASHSALE_PAYMENT_ADDR", any_port()),
            (
                "FLASHSALE_PAYMENT_DECLINE_RATE",
                options.decline_rate.to_string(),
            ),
            (
                "FLASHSALE_PAYMENT_LATENCY_MS",
                options.payment_latency_ms.to_string(),
            ),
        ]);
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();

        let stub = flashsale_payment_stub::start(
            flashsale_payment_stub::Config::from_env(&stub_env)?,
            shutdown.clone(),
        )
        .await?;
        let payment_url = format!("http://{}", stub.local_addr);
        tasks.push(tokio::spawn(async move {
            let _ = stub.task.await;
        }));
        let env = env_with(&[
            ("FLASHSALE_TOPIC_PREFIX", format!("{prefix}.")),
            ("FLASHSALE_TABLE_PREFIX", format!("{prefix}-")),
            ("FLASHSALE_GATEWAY_ADDR", any_port()),
            ("FLASHSALE_SHOP_METRICS_ADDR", any_port()),
            ("FLASHSALE_ORDER_METRICS_ADDR", any_port()),
            ("FLASHSALE_PAYMENT_URL", payment_url),
        ]);
        let mut cli = CliConfig::from_env(&env)?;
        // One creator at a time per test process (see kafka::ensure_topics);
        // the services then find their topics in place.
        {
            static CREATING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
            let _one_at_a_time = CREATING.lock().await;
            kafka::ensure_topics(&cli.kafka).await?;
        }

        let gateway =
            flashsale_gateway::start(flashsale_gateway::Config::from_env(&env)?, shutdown.clone())
                .await?;
        let gateway_url = format!("http://{}", gateway.local_addr);
        tasks.push(tokio::spawn(async move {
            let _ = gateway.task.await;
        }));
        let mut workers = Vec::new();
        for _ in 0..options.shop_workers {
            workers.push(start_shop_worker(&env, &shutdown).await?);
        }
        for _ in 0..options.order_workers {
            workers.push(start_order_worker(&env, &shutdown).await?);
        }
        for worker in workers {
            // Stopped with the pipeline; how it ended is the tests' business
            // only for the workers they add themselves.
            tasks.push(tokio::spawn(async move {
                let _ = worker.task.await;
            }));
        }
        cli.gateway_url = gateway_url.clone();
        let stores = Stores::connect(&cli).await?;
        Ok(Self {
            prefix,
            kafka: cli.kafka.clone(),
            env,
            cli,
            stores,
            gateway_url,
            http: reqwest::Client::new(),
            shutdown,
            tasks,
        })
    }

    /// Another shop-worker in this pipeline's consumer group.
    pub async fn add_shop_worker(&self) -> anyhow::Result<Worker> {
        start_shop_worker(&self.env, &self.shutdown).await
    }

    /// Another order-worker in this pipeline's consumer group.
    pub async fn add_order_worker(&self) -> anyhow::Result<Worker> {
        start_order_worker(&self.env, &self.shutdown).await
    }

    /// A sku name no other test uses (Redis is shared between tests).
    pub fn sku(&self, name: &str) -> Sku {
        Sku::parse(&format!("{}-{name}", self.prefix)).expect("test sku names are valid")
    }

    pub async fn create_sale(
        &self,
        sku: &Sku,
        stock: u64,
        per_user_limit: u64,
    ) -> anyhow::Result<SaleRules> {
        sale::create(
            &self.stores,
            &SaleSpec {
                sku: sku.clone(),
                stock,
                per_user_limit,
                price_cents: 1999,
                reservation_ttl: Duration::from_secs(600),
                starts_in: Duration::ZERO,
                duration: Duration::from_secs(3600),
            },
        )
        .await
    }

    pub async fn set_payment(&self, decline_rate: f64, latency_ms: u64) -> anyhow::Result<()> {
        Ok(self
            .stores
            .payment
            .set_behaviour(&StubBehaviour {
                decline_rate,
                latency_ms,
            })
            .await?)
    }

    pub fn topic(&self, base: &str) -> String {
        self.kafka.topic(base)
    }

    pub fn producer(&self) -> anyhow::Result<FutureProducer> {
        Ok(kafka::producer(&self.kafka)?)
    }

    /// How many records a topic holds (sum of high watermarks).
    pub async fn records_in(&self, topic_name: &str) -> anyhow::Result<i64> {
        let settings = self.kafka.clone();
        let topic_name = topic_name.to_owned();
        tokio::task::spawn_blocking(move || -> anyhow::Result<i64> {
            let consumer: BaseConsumer = kafka::base_config(&settings)
                .set("group.id", "flashsale-test-watermarks")
                .create()?;
            let mut total = 0;
            for partition in 0..settings.partitions {
                let (low, high) =
                    consumer.fetch_watermarks(&topic_name, partition, Duration::from_secs(5))?;
                total += high - low;
            }
            Ok(total)
        })
        .await?
    }

    /// Offsets the consumer group `group_base` has committed on a topic,
    /// summed over its partitions (0 where nothing is committed yet).
    pub async fn committed(&self, group_base: &str, topic_name: &str) -> anyhow::Result<i64> {
        let settings = self.kafka.clone();
        let group = self.kafka.group(group_base);
        let topic_name = topic_name.to_owned();
        tokio::task::spawn_blocking(move || -> anyhow::Result<i64> {
            let consumer: BaseConsumer = kafka::base_config(&settings)
                .set("group.id", &group)
                .create()?;
            let mut wanted = TopicPartitionList::new();
            for partition in 0..settings.partitions {
                wanted.add_partition(&topic_name, partition);
            }
            let committed = consumer.committed_offsets(wanted, Duration::from_secs(5))?;
            Ok(committed
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(n) => Some(n),
                    _ => None,
                })
                .sum())
        })
        .await?
    }

    /// The first record of a topic, waiting up to `deadline` for one.
    pub async fn first_record(
        &self,
        topic_name: &str,
        deadline: Duration,
    ) -> anyhow::Result<OwnedMessage> {
        let consumer: StreamConsumer = kafka::base_config(&self.kafka)
            .set(
                "group.id",
                format!("{}reader-{}", self.prefix, uuid::Uuid::now_v7().simple()),
            )
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()?;
        consumer.subscribe(&[topic_name])?;
        let message = tokio::time::timeout(deadline, consumer.recv()).await??;
        Ok(message.detach())
    }

    pub fn purchase_topic(&self) -> String {
        self.topic(topic::PURCHASE_REQUESTS)
    }

    /// Asks every service to stop and waits until they have.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

async fn start_shop_worker(env: &Env, pipeline: &CancellationToken) -> anyhow::Result<Worker> {
    let shutdown = pipeline.child_token();
    let worker = flashsale_shop_worker::start(
        flashsale_shop_worker::Config::from_env(env)?,
        shutdown.clone(),
    )
    .await?;
    Ok(Worker {
        shutdown,
        task: worker.task,
    })
}

async fn start_order_worker(env: &Env, pipeline: &CancellationToken) -> anyhow::Result<Worker> {
    let shutdown = pipeline.child_token();
    let worker = flashsale_order_worker::start(
        flashsale_order_worker::Config::from_env(env)?,
        shutdown.clone(),
    )
    .await?;
    Ok(Worker {
        shutdown,
        task: worker.task,
    })
}

/// Polls `check` until it returns `Some`, or fails after `deadline`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
