//! The stack a test starts for itself: settings pointing at the shared
//! local stack, a Redis or a broker of its own, and service processes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: a failure is the test's answer

use std::net::SocketAddr;
use std::time::Duration;

use flashsale_core::service::settings::Env;

use crate::{Pipeline, eventually};

/// The process environment's `FLASHSALE_*` settings (the stack's ports),
/// with `overrides` on top.
pub fn env_with(overrides: &[(&str, String)]) -> Env {
    env_with_more(&Env::process(), overrides)
}

/// A port nobody listens on now, for a process the test starts.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `name`'s directory under the test stack's state dir.
pub(crate) fn state_dir(name: &str) -> std::path::PathBuf {
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
    pub(crate) async fn start(prefix: &str) -> anyhow::Result<Self> {
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

    pub(crate) async fn spawn(&self) -> anyhow::Result<()> {
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
    pub(crate) fn stack_command(&self, args: &[&str]) -> std::process::Command {
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

    pub(crate) fn pid(&self) -> anyhow::Result<String> {
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

    pub(crate) fn signal(&self, name: &str) -> anyhow::Result<()> {
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

pub(crate) fn any_port() -> String {
    SocketAddr::from(([127, 0, 0, 1], 0)).to_string()
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
        self.signal("TERM");
    }

    /// SIGSTOP: the process keeps its connections and its state but does
    /// nothing (a long GC pause, a stalled VM), until `resume`.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let sent = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.0.id().to_string())
            .status();
        assert!(
            sent.is_ok_and(|s| s.success()),
            "kill -{name} {}",
            self.0.id()
        );
    }

    /// How it ended, if it has.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.try_wait().ok().flatten()
    }
}

impl From<std::process::Child> for ServiceProcess {
    fn from(child: std::process::Child) -> Self {
        Self(child)
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
