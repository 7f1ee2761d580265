//! The pipeline a campaign runs against: the local stack (started by
//! `scripts/chaos` on the campaign's own ports and state dir), a fault
//! proxy on every link from the services to a store or the payment
//! service, and the services themselves as processes of their own: one
//! gateway, one payment stub, two shop-workers and two order-workers (a
//! paused or killed worker has a group mate to take its partitions).
//!
//! Every fault a round injects is an operation here.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use flashsale_cli::{Config as CliConfig, Stores};
use flashsale_core::payment::StubBehaviour;
use flashsale_core::service::settings::{Env, SettingError};
use flashsale_fault_proxy::{Fault, FaultProxy};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

use crate::fault::{Net, Part};

/// Where the campaign finds the stack and the binaries, from `FLASHSALE_*`
/// settings (`scripts/chaos` sets them; the defaults are its own).
#[derive(Debug, Clone)]
pub struct WorldConfig {
    /// `FLASHSALE_STATE_DIR`: the stack's state, the services' logs, and
    /// the kept logs of failed rounds (`rounds/`).
    pub state_dir: PathBuf,
    /// `FLASHSALE_KAFKA_PORT`, `FLASHSALE_REDIS_PORT`,
    /// `FLASHSALE_DYNAMODB_PORT`: the stores, reached directly only by the
    /// campaign's checks.
    pub kafka_port: u16,
    pub redis_port: u16,
    pub dynamodb_port: u16,
    /// `FLASHSALE_KAFKA_ADVERTISED_PORT`: the port the broker names in its
    /// metadata, where the campaign's broker proxy listens (a Kafka client
    /// connects to what the metadata says, not to the bootstrap it was
    /// given, so the proxy must be the advertised address).
    pub kafka_advertised_port: u16,
    /// `FLASHSALE_CHAOS_PORT`: the gateway's port; the payment stub and the
    /// workers' metrics take the next ones.
    pub base_port: u16,
    /// `FLASHSALE_CHAOS_BIN_DIR`: the service binaries (default: beside
    /// this one).
    pub bin_dir: PathBuf,
    /// `FLASHSALE_CHAOS_STACK`: `infra/local/stack.sh`, to restart a store.
    pub stack_script: PathBuf,
    /// `FLASHSALE_CHAOS_SERVICE_LOG`: the services' `RUST_LOG` (default
    /// `info`), for replaying a round with more said.
    pub service_log: String,
}

impl WorldConfig {
    pub fn from_env(env: &Env) -> Result<Self, SettingError> {
        let here = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("target/release"));
        let kafka_port = env.get("KAFKA_PORT", 24092)?;
        Ok(Self {
            state_dir: PathBuf::from(env.string("STATE_DIR", ".flashsale/chaos")),
            kafka_port,
            redis_port: env.get("REDIS_PORT", 24379)?,
            dynamodb_port: env.get("DYNAMODB_PORT", 24000)?,
            kafka_advertised_port: env.get("KAFKA_ADVERTISED_PORT", kafka_port)?,
            base_port: env.get("CHAOS_PORT", 24100)?,
            bin_dir: PathBuf::from(env.string("CHAOS_BIN_DIR", &here.to_string_lossy())),
            stack_script: PathBuf::from(env.string("CHAOS_STACK", "infra/local/stack.sh")),
            service_log: env.string("CHAOS_SERVICE_LOG", "info"),
        })
    }

    fn gateway_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.base_port))
    }

    fn payment_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.base_port + 1))
    }

    /// Where a service instance answers `/readyz`.
    fn ops_addr(&self, instance: Instance) -> SocketAddr {
        let port = match instance.part {
            Part::Gateway => self.base_port,
            Part::Payment => self.base_port + 1,
            Part::ShopWorker => self.base_port + 10 + u16::from(instance.index),
            Part::OrderWorker => self.base_port + 20 + u16::from(instance.index),
            Part::Broker | Part::Redis | Part::Dynamodb => self.base_port + 30,
        };
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// The settings of the campaign's own checks: every store directly.
    pub fn cli_config(&self) -> Result<CliConfig, SettingError> {
        CliConfig::from_env(&Env::from_map(
            [
                ("KAFKA_BOOTSTRAP", format!("127.0.0.1:{}", self.kafka_port)),
                (
                    "REDIS_URL",
                    format!("redis://127.0.0.1:{}", self.redis_port),
                ),
                (
                    "DYNAMODB_ENDPOINT",
                    format!("http://127.0.0.1:{}", self.dynamodb_port),
                ),
                ("PAYMENT_URL", format!("http://{}", self.payment_addr())),
                ("GATEWAY_URL", format!("http://{}", self.gateway_addr())),
            ]
            .into_iter()
            .map(|(k, v)| (format!("FLASHSALE_{k}"), v))
            .collect(),
        ))
    }
}

/// One running service process: which part, and which of its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Instance {
    pub part: Part,
    pub index: u8,
}

impl Instance {
    pub const fn of(part: Part, index: u8) -> Self {
        Self { part, index }
    }

    fn binary(self) -> &'static str {
        match self.part {
            Part::Gateway => "gateway",
            Part::Payment => "payment-stub",
            Part::ShopWorker => "shop-worker",
            Part::OrderWorker => "order-worker",
            Part::Broker | Part::Redis | Part::Dynamodb => "",
        }
    }

    pub fn name(self) -> String {
        format!("{}-{}", self.part.name(), self.index)
    }
}

/// The services a campaign runs, in the order they start.
pub const INSTANCES: [Instance; 6] = [
    Instance::of(Part::Payment, 0),
    Instance::of(Part::Gateway, 0),
    Instance::of(Part::ShopWorker, 0),
    Instance::of(Part::ShopWorker, 1),
    Instance::of(Part::OrderWorker, 0),
    Instance::of(Part::OrderWorker, 1),
];

#[derive(Debug)]
struct Running {
    child: Child,
}

/// The fault proxies, one per link.
#[derive(Debug)]
pub struct Proxies {
    pub redis: FaultProxy,
    pub dynamodb: FaultProxy,
    pub payment: FaultProxy,
    pub broker: FaultProxy,
}

impl Proxies {
    pub fn of(&self, link: Part) -> Option<&FaultProxy> {
        match link {
            Part::Redis => Some(&self.redis),
            Part::Dynamodb => Some(&self.dynamodb),
            Part::Payment => Some(&self.payment),
            Part::Broker => Some(&self.broker),
            Part::Gateway | Part::ShopWorker | Part::OrderWorker => None,
        }
    }

    pub fn heal_all(&self) {
        for proxy in [&self.redis, &self.dynamodb, &self.payment, &self.broker] {
            proxy.set(Fault::None);
        }
    }
}

#[derive(Debug)]
pub struct World {
    pub config: WorldConfig,
    pub cli: CliConfig,
    pub stores: Stores,
    pub proxies: Proxies,
    pub http: reqwest::Client,
    running: Mutex<BTreeMap<Instance, Running>>,
}

impl World {
    /// Starts the proxies and the services on the running stack, and waits
    /// until every service is ready.
    pub async fn start(config: WorldConfig) -> anyhow::Result<Self> {
        std::fs::create_dir_all(config.state_dir.join("logs"))?;
        let local = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let any = local(0);
        let proxies = Proxies {
            redis: FaultProxy::start(any, local(config.redis_port)).await?,
            dynamodb: FaultProxy::start(any, local(config.dynamodb_port)).await?,
            payment: FaultProxy::start(any, config.payment_addr()).await?,
            broker: FaultProxy::start(
                local(config.kafka_advertised_port),
                local(config.kafka_port),
            )
            .await
            .with_context(|| {
                format!(
                    "the broker's proxy on the advertised port {}",
                    config.kafka_advertised_port
                )
            })?,
        };
        let cli = config.cli_config()?;
        let stores = Stores::connect(&cli).await?;
        let world = Self {
            config,
            cli,
            stores,
            proxies,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            running: Mutex::new(BTreeMap::new()),
        };
        for instance in INSTANCES {
            world.spawn(instance, None).await?;
            world.wait_ready(instance, Duration::from_secs(90)).await?;
        }
        Ok(world)
    }

    pub fn gateway_url(&self) -> String {
        format!("http://{}", self.config.gateway_addr())
    }

    pub fn log_path(&self, instance: Instance) -> PathBuf {
        self.config
            .state_dir
            .join("logs")
            .join(format!("{}.log", instance.name()))
    }

    /// The settings a service instance runs with: every store and the
    /// payment service through its proxy.
    fn service_env(&self, instance: Instance) -> Vec<(String, String)> {
        let c = &self.config;
        let state = c.state_dir.to_string_lossy().into_owned();
        let vars = [
            ("STATE_DIR", state.clone()),
            (
                "KAFKA_BOOTSTRAP",
                format!("127.0.0.1:{}", c.kafka_advertised_port),
            ),
            (
                "REDIS_URL",
                format!("redis://{}", self.proxies.redis.local_addr()),
            ),
            (
                "DYNAMODB_ENDPOINT",
                format!("http://{}", self.proxies.dynamodb.local_addr()),
            ),
            (
                "PAYMENT_URL",
                format!("http://{}", self.proxies.payment.local_addr()),
            ),
            ("GATEWAY_ADDR", c.gateway_addr().to_string()),
            ("PAYMENT_ADDR", c.payment_addr().to_string()),
            ("PAYMENT_LEDGER", format!("{state}/payment-ledger.jsonl")),
            ("SHOP_METRICS_ADDR", c.ops_addr(instance).to_string()),
            ("ORDER_METRICS_ADDR", c.ops_addr(instance).to_string()),
        ];
        vars.into_iter()
            .map(|(k, v)| (format!("FLASHSALE_{k}"), v))
            .chain([("RUST_LOG".to_owned(), c.service_log.clone())])
            .collect()
    }

    /// Starts `instance`, its clock `skew_s` seconds off when given, its
    /// output appended to its log.
    pub async fn spawn(&self, instance: Instance, skew_s: Option<f64>) -> anyhow::Result<()> {
        let binary = self.config.bin_dir.join(instance.binary());
        anyhow::ensure!(
            binary.exists(),
            "{} is missing: build the services first (scripts/chaos does)",
            binary.display()
        );
        let mut command = Command::new(&binary);
        if let Some(skew) = skew_s {
            // The service's own wall clock (`clock::skew`), not libfaketime:
            // see there why.
            command.env(
                "FLASHSALE_CLOCK_OFFSET_MS",
                ((skew * 1000.0).round() as i64).to_string(),
            );
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(instance))?;
        command
            .envs(self.service_env(instance))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", instance.name()))?;
        self.running
            .lock()
            .await
            .insert(instance, Running { child });
        Ok(())
    }

    /// Waits until `instance` answers `/readyz` with 200.
    pub async fn wait_ready(&self, instance: Instance, within: Duration) -> anyhow::Result<()> {
        let url = format!("http://{}/readyz", self.config.ops_addr(instance));
        let until = tokio::time::Instant::now() + within;
        loop {
            let ready = self
                .http
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(());
            }
            if tokio::time::Instant::now() >= until {
                anyhow::bail!(
                    "{} not ready within {within:?} (see {})",
                    instance.name(),
                    self.log_path(instance).display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends `signal` to `instance`'s process.
    async fn signal(&self, instance: Instance, signal: &str) -> anyhow::Result<()> {
        let running = self.running.lock().await;
        let pid = running
            .get(&instance)
            .and_then(|r| r.child.id())
            .with_context(|| format!("{} is not running", instance.name()))?;
        send_signal(pid, signal).await
    }

    /// SIGKILL: no drain, no commit, no goodbye to the group.
    pub async fn kill(&self, instance: Instance) -> anyhow::Result<()> {
        let taken = self.running.lock().await.remove(&instance);
        if let Some(mut running) = taken {
            running.child.kill().await?;
        }
        Ok(())
    }

    /// SIGTERM, and waits for the process to end (it drains first).
    pub async fn stop(&self, instance: Instance) -> anyhow::Result<()> {
        self.signal(instance, "TERM").await?;
        let taken = self.running.lock().await.remove(&instance);
        if let Some(mut running) = taken
            && tokio::time::timeout(Duration::from_secs(60), running.child.wait())
                .await
                .is_err()
        {
            running.child.kill().await?;
        }
        Ok(())
    }

    pub async fn pause(&self, instance: Instance) -> anyhow::Result<()> {
        self.signal(instance, "STOP").await
    }

    pub async fn resume(&self, instance: Instance) -> anyhow::Result<()> {
        self.signal(instance, "CONT").await
    }

    /// Starts `instance` again (after a kill), and waits until it is ready.
    pub async fn restart(&self, instance: Instance, skew_s: Option<f64>) -> anyhow::Result<()> {
        self.spawn(instance, skew_s).await?;
        self.wait_ready(instance, Duration::from_secs(90)).await
    }

    /// The services that exited on their own (not by a fault), each with
    /// how it ended; they are forgotten, for `restart`.
    pub async fn crashed(&self) -> Vec<(Instance, String)> {
        let mut running = self.running.lock().await;
        let mut out = Vec::new();
        for (instance, r) in running.iter_mut() {
            if let Ok(Some(status)) = r.child.try_wait() {
                out.push((
                    *instance,
                    format!("{} exited on its own: {status}", instance.name()),
                ));
            }
        }
        for (instance, _) in &out {
            running.remove(instance);
        }
        out
    }

    /// The store's process, as the stack's pid file names it.
    fn store_pid(&self, store: Part) -> anyhow::Result<u32> {
        let file = self
            .config
            .state_dir
            .join(format!("{}.pid", stack_name(store)));
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        Ok(text.trim().parse()?)
    }

    /// SIGKILL of a store. The broker's keeper (which restarts a broker
    /// that died) goes first, so that the store stays down until
    /// `start_store`.
    pub async fn kill_store(&self, store: Part) -> anyhow::Result<()> {
        if store == Part::Broker {
            let keeper = self.config.state_dir.join("kafka-keeper.pid");
            if let Ok(pid) = std::fs::read_to_string(&keeper) {
                let _ = send_signal(pid.trim().parse()?, "KILL").await;
            }
        }
        let pid = self.store_pid(store)?;
        send_signal(pid, "KILL").await?;
        // SIGKILL is delivered, not done: until the process is gone and its
        // port closed (a JVM's threads outlive its main one by a moment),
        // the stack's script would not start another.
        let port = match store {
            Part::Broker => self.config.kafka_port,
            Part::Redis => self.config.redis_port,
            _ => self.config.dynamodb_port,
        };
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        while alive(pid) || listening(port) {
            anyhow::ensure!(
                tokio::time::Instant::now() < until,
                "{} (pid {pid}) outlived SIGKILL by 10 s",
                store.name()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = std::fs::remove_file(
            self.config
                .state_dir
                .join(format!("{}.pid", stack_name(store))),
        );
        Ok(())
    }

    /// Starts whatever store is not running (a round that failed half-way
    /// may have left one down); the others are left alone.
    pub async fn ensure_stores(&self) -> anyhow::Result<()> {
        self.stack(&["start"]).await
    }

    /// Starts a killed store again on its data, with the stack's script.
    pub async fn start_store(&self, store: Part) -> anyhow::Result<()> {
        self.stack(&["start", stack_name(store)]).await
    }

    /// `stack.sh args` on the campaign's stack.
    async fn stack(&self, args: &[&str]) -> anyhow::Result<()> {
        let output = Command::new(&self.config.stack_script)
            .args(args)
            .env("FLASHSALE_STATE_DIR", &self.config.state_dir)
            .output()
            .await
            .with_context(|| format!("running {}", self.config.stack_script.display()))?;
        anyhow::ensure!(
            output.status.success(),
            "stack.sh {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    }

    pub fn set_link(&self, link: Part, net: Option<(Net, f64)>) {
        let Some(proxy) = self.proxies.of(link) else {
            return;
        };
        proxy.set(match net {
            None => Fault::None,
            Some((Net::Slow, ms)) => Fault::Latency(Duration::from_millis(ms as u64)),
            Some((Net::Cut, _)) => Fault::Cut,
            Some((Net::Blackhole, _)) => Fault::BlackHole,
        });
    }

    /// The payment stub's behaviour, set through its admin endpoint
    /// (directly, not through the proxy a link fault may be cutting).
    pub async fn set_payment(&self, behaviour: &StubBehaviour) -> anyhow::Result<()> {
        let url = format!("http://{}/admin/behaviour", self.config.payment_addr());
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            // The stub may be restarting (a kill round): try until it answers.
            let sent = self.http.put(&url).json(behaviour).send().await;
            match sent {
                Ok(r) if r.status().is_success() => return Ok(()),
                _ if tokio::time::Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok(r) => anyhow::bail!("the payment stub refused its behaviour: {}", r.status()),
                Err(e) => anyhow::bail!("the payment stub does not answer: {e}"),
            }
        }
    }

    /// Stops every service (workers first, so they drain).
    pub async fn shutdown(&self) {
        for instance in INSTANCES.iter().rev() {
            let _ = self.resume(*instance).await;
            let _ = self.stop(*instance).await;
        }
    }
}

/// The store's name in `infra/local/stack.sh` and its pid files.
fn stack_name(store: Part) -> &'static str {
    match store {
        Part::Broker => "kafka",
        Part::Redis => "redis",
        Part::Dynamodb => "dynamodb",
        Part::Gateway | Part::ShopWorker | Part::OrderWorker | Part::Payment => "",
    }
}

/// Whether `pid` is a live process (a zombie, dead but not yet reaped,
/// is not).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

async fn send_signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .await?;
    anyhow::ensure!(status.success(), "kill -{signal} {pid} failed");
    Ok(())
}
