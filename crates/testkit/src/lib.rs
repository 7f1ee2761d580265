//! Starts a whole flashsale pipeline in-process, against the real local
//! stack (the Kafka, Redis and DynamoDB Local that `./scripts/test` runs),
//! for integration tests.
//!
//! Each pipeline gets its own topic, consumer-group and table prefix, and
//! its services listen on ports the OS picks, so tests run in parallel
//! without seeing each other's data. Sku names are unique per pipeline too,
//! because Redis is shared.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: a failure is the test's answer

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use flashsale_cli::sale::{self, SaleSpec};
use flashsale_cli::{Config as CliConfig, Stores};
use flashsale_core::bus::consumer::Abandoned;
use flashsale_core::bus::kafka::{self, topic};
use flashsale_core::bus::topic_reader;
use flashsale_core::dynamo::orders::Order;
use flashsale_core::ids::{RequestId, Sku};
use flashsale_core::payment::StubBehaviour;
use flashsale_core::service::settings::{Env, KafkaSettings};
use flashsale_core::service::worker::RunningWorker;
use flashsale_core::status::PurchaseStatus;
use flashsale_core::stock::SaleRules;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::FutureProducer;
use tokio_util::sync::CancellationToken;

pub use flashsale_cli;
pub use flashsale_core;
pub use flashsale_gateway;

/// The process environment's `FLASHSALE_*` settings (the stack's ports),
/// with `overrides` on top.
pub fn env_with(overrides: &[(&str, String)]) -> Env {
    env_with_more(&Env::process(), overrides)
}

/// A port nobody listens on now, for a process the test starts.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `name`'s directory under the test stack's state dir.
fn state_dir(name: &str) -> std::path::PathBuf {
    let base = std::env::var("FLASHSALE_STATE_DIR").unwrap_or_else(|_| "/tmp".into());
    std::path::Path::new(&base).join(name)
}

pub fn env_with_more(env: &Env, more: &[(&str, String)]) -> Env {
    let mut vars = env.vars();
    for (k, v) in more {
        vars.insert((*k).to_owned(), v.clone());
    }
    Env::from_map(vars)
}

/// A `redis-server` child process of one pipeline, with the local stack's
/// durability (`appendfsync always`), that a test may kill and wipe.
#[derive(Debug)]
pub struct OwnRedis {
    port: u16,
    dir: std::path::PathBuf,
    child: std::sync::Mutex<Option<std::process::Child>>,
}

impl OwnRedis {
    async fn start(prefix: &str) -> anyhow::Result<Self> {
        let own = Self {
            port: free_port()?,
            dir: state_dir(&format!("redis-{prefix}")),
            child: std::sync::Mutex::new(None),
        };
        own.spawn().await?;
        Ok(own)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()?;
        *self.child.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = Some(child);
        let client = redis::Client::open(self.url())?;
        eventually(
            "the pipeline's own Redis to answer",
            Duration::from_secs(10),
            || {
                let client = client.clone();
                async move {
                    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                    redis::cmd("PING")
                        .query_async::<String>(&mut conn)
                        .await
                        .ok()
                }
            },
        )
        .await;
        Ok(())
    }

    /// SIGKILL, then the same Redis started again on its data: a crash and
    /// restart that loses nothing acknowledged, but every connection.
    pub async fn restart(&self) -> anyhow::Result<()> {
        self.kill()?;
        self.spawn().await
    }

    /// SIGKILL: no shutdown, no final fsync beyond what `always` did.
    pub fn kill(&self) -> anyhow::Result<()> {
        if let Some(mut child) = self
            .child
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .take()
        {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Redis lost entirely: its data directory deleted, an empty one started
    /// on the same port.
    pub async fn wipe_and_restart(&self) -> anyhow::Result<()> {
        self.kill()?;
        std::fs::remove_dir_all(&self.dir)?;
        self.spawn().await
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Kafka broker of one pipeline's own, started and stopped by the local
/// stack's own script (`infra/local/stack.sh`, so with the stack's index
/// and trimming), for tests that stall, restart or trim it without
/// disturbing the tests that share the suite's broker.
#[derive(Debug)]
pub struct OwnKafka {
    port: u16,
    dir: std::path::PathBuf,
}

impl OwnKafka {
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        let own = Self {
            port: free_port()?,
            dir: state_dir(&format!("kafka-{name}")),
        };
        own.stack(&["start", "kafka"]).await?;
        Ok(own)
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Its SQLite database.
    pub fn database(&self) -> std::path::PathBuf {
        self.dir.join("kafka.db")
    }

    /// `stack.sh args` on this broker's state dir and port. Its keeper
    /// never trims (a test trims when it means to); it still restarts a
    /// broker that died or stopped serving.
    fn stack_command(&self, args: &[&str]) -> std::process::Command {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../infra/local/stack.sh");
        let mut command = std::process::Command::new(script);
        command
            .args(args)
            .env("FLASHSALE_STATE_DIR", &self.dir)
            .env("FLASHSALE_KAFKA_PORT", self.port.to_string())
            .env("FLASHSALE_KAFKA_TRIM_RECORDS", "0");
        command
    }

    pub async fn stack(&self, args: &[&str]) -> anyhow::Result<()> {
        let output = tokio::process::Command::from(self.stack_command(args))
            .output()
            .await?;
        anyhow::ensure!(
            output.status.success(),
            "stack.sh {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    }

    fn pid(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(self.dir.join("kafka.pid"))?
            .trim()
            .to_owned())
    }

    /// SIGSTOP: the broker stops answering but keeps every connection,
    /// like a process stalled on its disk or a paused VM.
    pub fn pause(&self) -> anyhow::Result<()> {
        self.signal("STOP")
    }

    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal("CONT")
    }

    fn signal(&self, name: &str) -> anyhow::Result<()> {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid()?)
            .status()?;
        anyhow::ensure!(status.success(), "kill -{name} failed");
        Ok(())
    }
}

impl Drop for OwnKafka {
    fn drop(&mut self) {
        let _ = self.resume();
        let _ = self
            .stack_command(&["stop"])
            .stderr(std::process::Stdio::null())
            .status();
        if std::thread::panicking() {
            eprintln!(
                "the broker's log and data are kept in {}",
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn any_port() -> String {
    SocketAddr::from(([127, 0, 0, 1], 0)).to_string()
}

/// A gateway's answer: status, headers and JSON body (`Null` if none).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: serde_json::Value,
}

impl Answer {
    pub async fn of(response: reqwest::Response) -> anyhow::Result<Self> {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await?;
        Ok(Self {
            status,
            headers,
            body: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        })
    }

    /// The problem type of a refusal (`sold-out`, `sale-not-active`, ...).
    pub fn kind(&self) -> &str {
        self.body["type"].as_str().unwrap_or("")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `Retry-After` in seconds, if given.
    pub fn retry_after(&self) -> Option<u64> {
        self.header("retry-after").and_then(|v| v.parse().ok())
    }
}

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

    /// The value of one sample of a service's `/metrics`, e.g.
    /// `gateway_shed_total{reason="sold_out"}`; 0 when absent.
    pub async fn metric(&self, base_url: &str, sample: &str) -> f64 {
        let text = match self.http.get(format!("{base_url}/metrics")).send().await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        text.lines()
            .find_map(|line| {
                line.strip_prefix(sample)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .and_then(|value| value.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }

    /// Another shop-worker in this pipeline's consumer group.
    pub async fn add_shop_worker(&self) -> anyhow::Result<Worker> {
        start_shop_worker(&self.env, &self.shutdown).await
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

    /// POSTs a purchase of one unit; `Err` only if the gateway could not
    /// be reached at all.
    pub async fn try_buy(
        &self,
        sku: &str,
        user: &str,
        key: Option<&str>,
    ) -> reqwest::Result<(u16, serde_json::Value)> {
        let mut request = self
            .http
            .post(format!("{}/v1/purchases", self.gateway_url))
            .json(&serde_json::json!({"sku": sku, "user_id": user, "quantity": 1}));
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        Ok((
            status,
            response.json().await.unwrap_or(serde_json::Value::Null),
        ))
    }

    /// `GET /v1/skus/{sku}` of the gateway at `base_url`: `None` while it
    /// does not answer with one.
    pub async fn sku_view(&self, base_url: &str, sku: &Sku) -> Option<serde_json::Value> {
        self.http
            .get(format!("{base_url}/v1/skus/{sku}"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()
    }

    /// A sale as DynamoDB holds it, its orders, and every charge the
    /// payment service made for it.
    pub async fn sale_books(
        &self,
        sku: &Sku,
    ) -> anyhow::Result<(
        flashsale_core::dynamo::inventory::Sale,
        Vec<flashsale_core::dynamo::orders::Order>,
        Vec<flashsale_core::payment::Charge>,
    )> {
        let sale = self
            .stores
            .inventory
            .get(sku)
            .await?
            .ok_or_else(|| anyhow::anyhow!("{sku} has no sale"))?;
        let orders = self.stores.orders.of_sale(sku, &sale.rules.sale_id).await?;
        let charges = self
            .stores
            .payment
            .charges_of_sale(&sale.rules.sale_id)
            .await?;
        Ok((sale, orders, charges))
    }

    /// What the stub and DynamoDB say about a sale, checked: no order was
    /// charged twice, a charge was kept exactly on the confirmed orders,
    /// every order is at rest, and the audit is clean. The orders by status.
    pub async fn money_adds_up(
        &self,
        sku: &Sku,
    ) -> std::collections::HashMap<flashsale_core::dynamo::orders::OrderStatus, usize> {
        use flashsale_core::dynamo::orders::OrderStatus;
        use flashsale_core::payment::ChargeStatus;
        let (_, orders, charges) = self.sale_books(sku).await.expect("the sale's books");
        let mut per_order: std::collections::HashMap<&str, Vec<_>> = Default::default();
        for charge in &charges {
            per_order
                .entry(charge.metadata.order_id.as_str())
                .or_default()
                .push(charge);
        }
        let mut by_status = std::collections::HashMap::new();
        for order in &orders {
            *by_status.entry(order.status).or_default() += 1;
            let id = order.order_id.to_string();
            let made = per_order.remove(id.as_str()).unwrap_or_default();
            assert!(made.len() <= 1, "{id} charged {} times", made.len());
            let kept = made
                .iter()
                .filter(|c| c.status == ChargeStatus::Succeeded && !c.refunded)
                .count();
            match order.status {
                OrderStatus::Confirmed => {
                    assert_eq!(kept, 1, "confirmed {id} without a kept charge: {made:?}")
                }
                OrderStatus::Cancelled => assert_eq!(kept, 0, "cancelled {id} kept {made:?}"),
                other => panic!("{id} is still {other} at rest"),
            }
        }
        assert!(
            per_order.is_empty(),
            "charges without an order: {per_order:?}"
        );
        let audit = self.stores.audit(sku, true).await.expect("the audit runs");
        assert!(audit.ok(), "{:?}", audit.violations);
        by_status
    }

    /// POSTs one unit of `sku` for `user` to the gateway at `base_url`,
    /// with the response's headers.
    pub async fn post_purchase(
        &self,
        base_url: &str,
        sku: &str,
        user: &str,
        key: Option<&str>,
    ) -> anyhow::Result<Answer> {
        let mut request = self
            .http
            .post(format!("{base_url}/v1/purchases"))
            .json(&serde_json::json!({"sku": sku, "user_id": user, "quantity": 1}));
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        Answer::of(request.send().await?).await
    }

    /// `try_buy`, for gateways that must answer.
    pub async fn buy(&self, sku: &str, user: &str, key: Option<&str>) -> (u16, serde_json::Value) {
        self.try_buy(sku, user, key).await.expect("gateway answers")
    }

    /// GET with a long poll: `None` while the gateway does not know the id
    /// (or cannot answer).
    pub async fn status_of(&self, id: &str, wait_secs: u64) -> Option<PurchaseStatus> {
        let url = format!("{}/v1/purchases/{id}?wait={wait_secs}", self.gateway_url);
        let response = self.http.get(&url).send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.json().await.ok()
    }

    /// The order stored in DynamoDB for the request id the gateway answered.
    pub async fn order(&self, id: &str) -> Option<Order> {
        let id = RequestId::parse(id).expect("a request id");
        self.stores.orders.get(id).await.expect("DynamoDB answers")
    }

    /// Waits (up to a minute) for the purchase's terminal state.
    pub async fn terminal(&self, id: &str) -> PurchaseStatus {
        eventually("a terminal state", Duration::from_secs(60), || async {
            self.status_of(id, 5)
                .await
                .filter(|s| s.status.is_terminal())
        })
        .await
    }

    pub fn topic(&self, base: &str) -> String {
        self.kafka.topic(base)
    }

    pub fn producer(&self) -> anyhow::Result<FutureProducer> {
        Ok(kafka::producer(&self.kafka)?)
    }

    /// How many records a topic holds (sum of high watermarks).
    pub async fn records_in(&self, topic_name: &str) -> anyhow::Result<i64> {
        Ok(topic_reader::watermarks(&self.kafka, topic_name)
            .await?
            .iter()
            .map(|r| r.high - r.low)
            .sum())
    }

    /// Offsets the consumer group `group_base` has committed on a topic,
    /// summed over its partitions (0 where nothing is committed yet).
    pub async fn committed(&self, group_base: &str, topic_name: &str) -> anyhow::Result<i64> {
        Ok(
            topic_reader::committed(&self.kafka, &self.kafka.group(group_base), topic_name)
                .await?
                .iter()
                .filter_map(|(_, offset)| *offset)
                .sum(),
        )
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

/// A service binary built next to the running test (`./scripts/test`
/// builds every binary before the tests run).
pub fn service_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps")
        .join(name);
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --bins` first (./scripts/test does)",
        bin.display()
    );
    bin
}

/// A service running as a process of its own, killed (SIGKILL) when
/// dropped, so a failing test leaves no worker behind (it would keep the
/// test's output open and consume a dead pipeline's topics).
#[derive(Debug)]
pub struct ServiceProcess(std::process::Child);

impl ServiceProcess {
    /// SIGKILL: no drain, no commit, no goodbye to the group.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// SIGTERM: what an operator (or Kubernetes) sends to stop it.
    pub fn terminate(&self) {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
    }

    /// How it ended, if it has.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.try_wait().ok().flatten()
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Pipeline {
    /// The service binary `name` (`shop-worker`, `order-worker`) as a
    /// process of this pipeline, with `more` settings.
    pub fn service_process(&self, name: &str, more: &[(&str, String)]) -> ServiceProcess {
        let mut command = std::process::Command::new(service_binary(name));
        command
            .envs(self.env.vars())
            .env("FLASHSALE_ORDER_METRICS_ADDR", "127.0.0.1:0")
            .env("FLASHSALE_SHOP_METRICS_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null());
        for (key, value) in more {
            command.env(key, value);
        }
        ServiceProcess(command.spawn().expect("the service starts"))
    }
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
