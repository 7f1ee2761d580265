//! Starts a whole flashsale pipeline in-process, against the real local
//! stack (the Kafka, Redis and DynamoDB Local that `./scripts/test` runs),
//! for integration tests.
//!
//! Each pipeline gets its own topic, consumer-group and table prefix, and
//! its services listen on ports the OS picks, so tests run in parallel
//! without seeing each other's data. Sku names are unique per pipeline too,
//! because Redis is shared.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: a failure is the test's answer

use std::time::Duration;

use flashsale_cli::sale::{self, SaleSpec};
use flashsale_cli::{Config as CliConfig, Stores};
use flashsale_core::bus::consumer::Abandoned;
use flashsale_core::bus::kafka;
use flashsale_core::ids::Sku;
use flashsale_core::payment::StubBehaviour;
use flashsale_core::service::settings::{Env, KafkaSettings};
use flashsale_core::service::worker::RunningWorker;
use flashsale_core::stock::SaleRules;
use tokio_util::sync::CancellationToken;

pub use flashsale_cli;
pub use flashsale_core;
pub use flashsale_gateway;

mod asserts;
mod clients;
mod stack;

pub use asserts::{eventually, eventually_reads};
pub use clients::{Answer, dom_in_chromium};
use stack::any_port;
pub use stack::{
    OwnKafka, OwnRedis, ServiceProcess, env_with, env_with_more, free_port, service_binary,
};

#[derive(Debug, Clone)]
pub struct PipelineOptions {
    pub decline_rate: f64,
    pub payment_latency_ms: u64,
    pub shop_workers: usize,
    pub order_workers: usize,
    /// Gateway instances; `gateway_url` is the first.
    pub gateways: usize,
    /// A Redis of the pipeline's own (a child process) instead of the shared
    /// one, for tests that kill and wipe it.
    pub own_redis: bool,
    /// A Kafka broker of the pipeline's own (see `OwnKafka`) instead of the
    /// shared one, for tests that stall or restart it.
    pub own_kafka: bool,
    /// More `FLASHSALE_*` settings for every service of the pipeline.
    pub env: Vec<(&'static str, String)>,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        Self {
            decline_rate: 0.0,
            payment_latency_ms: 5,
            shop_workers: 1,
            order_workers: 1,
            gateways: 1,
            own_redis: false,
            own_kafka: false,
            env: Vec::new(),
        }
    }
}

/// One worker of a pipeline, stoppable on its own (an operator scaling in).
#[derive(Debug)]
pub struct Worker {
    /// Base URL of its `/metrics`, `/healthz`, `/readyz`.
    pub metrics_url: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), Abandoned>>,
}

impl Worker {
    fn of(running: RunningWorker, shutdown: CancellationToken) -> Self {
        Self {
            metrics_url: format!("http://{}", running.metrics_addr),
            shutdown,
            task: running.task,
        }
    }

    /// SIGTERM, in effect: finish in-flight work, commit, leave the group.
    /// `Err` if the worker had stopped on its own before.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        Ok(self.task.await??)
    }
}

#[derive(Debug)]
pub struct Pipeline {
    /// Unique to this pipeline: the prefix of its topics, groups and tables.
    pub prefix: String,
    pub env: Env,
    pub kafka: KafkaSettings,
    pub cli: CliConfig,
    pub stores: Stores,
    pub gateway_url: String,
    /// Every gateway instance started with the pipeline.
    pub gateway_urls: Vec<String>,
    /// The `/metrics` base URLs of the workers started with the pipeline:
    /// the shop-workers', then the order-workers'.
    pub worker_metrics: Vec<String>,
    pub http: reqwest::Client,
    /// The pipeline's own Redis, when `own_redis` was asked for.
    pub redis: Option<OwnRedis>,
    /// The pipeline's own broker, when `own_kafka` was asked for.
    pub broker: Option<OwnKafka>,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Pipeline {
    pub async fn start(options: PipelineOptions) -> anyhow::Result<Self> {
        flashsale_core::service::ops::init_tracing();
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
            // A ledger file of the pipeline's own: persisted as in
            // production, and no earlier run answers for this one.
            (
                "FLASHSALE_PAYMENT_LEDGER",
                format!(
                    "{}/payment-{prefix}.jsonl",
                    std::env::var("FLASHSALE_STATE_DIR").unwrap_or_else(|_| "/tmp".into())
                ),
            ),
        ]);
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let redis = if options.own_redis {
            Some(OwnRedis::start(&prefix).await?)
        } else {
            None
        };

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
            // Expired reservations come back quickly in tests that wait for it.
            ("FLASHSALE_EXPIRY_SWEEP_MS", "100".into()),
        ]);
        let env = match &redis {
            Some(own) => env_with_more(&env, &[("FLASHSALE_REDIS_URL", own.url())]),
            None => env,
        };
        let broker = if options.own_kafka {
            Some(OwnKafka::start(&prefix).await?)
        } else {
            None
        };
        let env = match &broker {
            Some(own) => env_with_more(&env, &[("FLASHSALE_KAFKA_BOOTSTRAP", own.bootstrap())]),
            None => env,
        };
        let env = env_with_more(&env, &options.env);
        let mut cli = CliConfig::from_env(&env)?;
        // One creator at a time per test process (see kafka::ensure_topics);
        // the services then find their topics in place.
        {
            static CREATING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
            let _one_at_a_time = CREATING.lock().await;
            kafka::ensure_topics(&cli.kafka).await?;
        }

        let mut gateway_urls = Vec::new();
        for _ in 0..options.gateways.max(1) {
            gateway_urls.push(start_gateway(&env, &shutdown, &mut tasks).await?);
        }
        let gateway_url = gateway_urls[0].clone();
        let mut workers = Vec::new();
        for _ in 0..options.shop_workers {
            workers.push(start_shop_worker(&env, &shutdown).await?);
        }
        for _ in 0..options.order_workers {
            workers.push(start_order_worker(&env, &shutdown).await?);
        }
        let worker_metrics = workers.iter().map(|w| w.metrics_url.clone()).collect();
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
            gateway_urls,
            worker_metrics,
            http: reqwest::Client::new(),
            redis,
            broker,
            shutdown,
            tasks,
        })
    }

    /// A pipeline with its gateway and no workers: what reaches Kafka
    /// stays (tests add their own workers, or need none).
    pub async fn gateways_only() -> Self {
        Self::start(PipelineOptions {
            shop_workers: 0,
            order_workers: 0,
            ..Default::default()
        })
        .await
        .expect("pipeline starts")
    }

    /// Another gateway instance, with `overrides` on the pipeline's
    /// settings; stopped with the pipeline. Returns its base URL.
    pub async fn add_gateway(&mut self, overrides: &[(&str, String)]) -> anyhow::Result<String> {
        let env = env_with_more(&self.env, overrides);
        start_gateway(&env, &self.shutdown, &mut self.tasks).await
    }

    /// Another shop-worker in this pipeline's consumer group.
    pub async fn add_shop_worker(&self) -> anyhow::Result<Worker> {
        start_shop_worker(&self.env, &self.shutdown).await
    }

    /// Another shop-worker, with `overrides` on the pipeline's settings
    /// (a store reached through a fault proxy, say).
    pub async fn add_shop_worker_with(
        &self,
        overrides: &[(&str, String)],
    ) -> anyhow::Result<Worker> {
        start_shop_worker(&env_with_more(&self.env, overrides), &self.shutdown).await
    }

    /// Another order-worker in this pipeline's consumer group.
    pub async fn add_order_worker(&self) -> anyhow::Result<Worker> {
        start_order_worker(&self.env, &self.shutdown).await
    }

    /// Another order-worker, with settings of its own on top of the
    /// pipeline's.
    pub async fn add_order_worker_with(
        &self,
        overrides: &[(&str, String)],
    ) -> anyhow::Result<Worker> {
        start_order_worker(&env_with_more(&self.env, overrides), &self.shutdown).await
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
        self.create_sale_with(&Self::spec(sku, stock, per_user_limit))
            .await
    }

    /// The sale `create_sale` makes, to adjust before `create_sale_with`.
    pub fn spec(sku: &Sku, stock: u64, per_user_limit: u64) -> SaleSpec {
        SaleSpec {
            sku: sku.clone(),
            stock,
            per_user_limit,
            price_cents: 1999,
            reservation_ttl: Duration::from_secs(600),
            starts_in: Duration::ZERO,
            duration: Duration::from_secs(3600),
            overbook: flashsale_core::stock::DEFAULT_OVERBOOK,
        }
    }

    pub async fn create_sale_with(&self, spec: &SaleSpec) -> anyhow::Result<SaleRules> {
        sale::create(&self.stores, spec).await
    }

    pub async fn set_payment(&self, decline_rate: f64, latency_ms: u64) -> anyhow::Result<()> {
        Ok(self
            .stores
            .payment
            .set_behaviour(&StubBehaviour::simple(decline_rate, latency_ms))
            .await?)
    }

    /// Asks every service to stop and waits until they have.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

async fn start_gateway(
    env: &Env,
    shutdown: &CancellationToken,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<String> {
    let env = env_with_more(env, &[("FLASHSALE_GATEWAY_ADDR", any_port())]);
    let gateway =
        flashsale_gateway::start(flashsale_gateway::Config::from_env(&env)?, shutdown.clone())
            .await?;
    let url = format!("http://{}", gateway.local_addr);
    tasks.push(tokio::spawn(async move {
        let _ = gateway.task.await;
    }));
    Ok(url)
}

async fn start_shop_worker(env: &Env, pipeline: &CancellationToken) -> anyhow::Result<Worker> {
    let shutdown = pipeline.child_token();
    let config = flashsale_shop_worker::Config::from_env(env)?;
    let running = flashsale_shop_worker::start(config, shutdown.clone()).await?;
    Ok(Worker::of(running, shutdown))
}

async fn start_order_worker(env: &Env, pipeline: &CancellationToken) -> anyhow::Result<Worker> {
    let shutdown = pipeline.child_token();
    let config = flashsale_order_worker::Config::from_env(env)?;
    let running = flashsale_order_worker::start(config, shutdown.clone()).await?;
    Ok(Worker::of(running, shutdown))
}
