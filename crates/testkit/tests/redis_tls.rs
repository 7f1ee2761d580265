//! Redis over TLS with an ACL user, as a managed Redis runs (ElastiCache
//! with in-transit encryption and RBAC): a real `redis-server` on a TLS
//! port only, its certificate signed by a CA made for the test, the
//! `default` user switched off. A single Redis and a 3-master cluster whose
//! bus is TLS too; the stock scripts run on both, and what should be
//! refused (an unknown CA, a wrong password, a plain connection) is.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure here is the test's answer

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flashsale_testkit::flashsale_core::bus::messages::{PurchaseRequest, SCHEMA_VERSION};
use flashsale_testkit::flashsale_core::ids::{Quantity, RequestId, Sku, UserId};
use flashsale_testkit::flashsale_core::service::redis_conn::{self, RedisConn};
use flashsale_testkit::flashsale_core::service::settings::{self, RedisAccess, RedisSettings};
use flashsale_testkit::flashsale_core::stock::{
    CommitOutcome, OpenOutcome, ReserveOutcome, SaleRules, StockStore,
};
use flashsale_testkit::{env_with, free_port, service_binary};

const USER: &str = "flashsale";
const PASSWORD: &str = "a-long-test-secret";
const FOREVER: u64 = 1_000_000_000_000_000;

/// A CA and a server certificate for 127.0.0.1, made with `openssl`.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("openssl runs (infra/local/install.sh installs it)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let p256 = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        openssl(
            &[
                &["req", "-x509", "-nodes", "-days", "2"][..],
                &p256,
                &["-subj", "/CN=flashsale test CA"],
                &["-keyout", "ca.key", "-out", "ca.pem"],
            ]
            .concat(),
        );
        openssl(
            &[
                &["req", "-nodes"][..],
                &p256,
                &["-subj", "/CN=localhost"],
                &["-keyout", "server.key", "-out", "server.csr"],
            ]
            .concat(),
        );
        std::fs::write(
            dir.join("san.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ]);
        Self {
            dir: dir.to_owned(),
        }
    }

    fn file(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }
}

/// `redis-server` processes listening on TLS ports only, killed on drop.
struct TlsRedis {
    ports: Vec<u16>,
    children: Vec<Child>,
    pki: Pki,
    dir: PathBuf,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TlsRedis {
    /// One node, or `nodes` masters of a cluster whose bus is TLS as well.
    fn start(name: &str, nodes: usize, cluster: bool) -> Self {
        let base = std::env::var("FLASHSALE_STATE_DIR").unwrap_or_else(|_| "/tmp".into());
        let dir = Path::new(&base).join(format!("redis-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pki = Pki::new(&dir.join("pki"));
        let mut redis = Self {
            ports: Vec::new(),
            children: Vec::new(),
            pki,
            dir: dir.clone(),
        };
        for _ in 0..nodes {
            let port = free_port().unwrap();
            let node_dir = dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir).unwrap();
            // Only the named user: a client that does not AUTH as it can
            // do nothing, as with ElastiCache RBAC. (ACL lines go in a file:
            // redis-server takes a `--user` argument as one user name.)
            let conf = node_dir.join("users.conf");
            std::fs::write(
                &conf,
                format!("user default off\nuser {USER} on >{PASSWORD} ~* &* +@all\n"),
            )
            .unwrap();
            let mut command = Command::new("redis-server");
            command
                .arg(&conf)
                .args(["--port", "0", "--tls-port", &port.to_string()])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&node_dir)
                .args(["--tls-cert-file", &redis.pki.file("server.pem")])
                .args(["--tls-key-file", &redis.pki.file("server.key")])
                .args(["--tls-ca-cert-file", &redis.pki.file("ca.pem")])
                .args(["--tls-auth-clients", "no"])
                .stdout(Stdio::null());
            if cluster {
                command
                    .args(["--cluster-enabled", "yes", "--tls-cluster", "yes"])
                    .args(["--cluster-port", &free_port().unwrap().to_string()])
                    .args(["--cluster-node-timeout", "5000"]);
            }
            redis
                .children
                .push(command.spawn().expect("redis-server starts"));
            redis.ports.push(port);
        }
        for port in redis.ports.clone() {
            redis.wait_until("the node answers", |r| {
                r.cli(port, &["PING"])
                    .is_some_and(|out| out.trim() == "PONG")
            });
        }
        if cluster {
            let nodes: Vec<String> = redis
                .ports
                .iter()
                .map(|port| format!("127.0.0.1:{port}"))
                .collect();
            let mut args = vec!["--cluster", "create"];
            args.extend(nodes.iter().map(String::as_str));
            args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
            let created = redis.cli(redis.ports[0], &args);
            assert!(created.is_some(), "redis-cli --cluster create failed");
            for port in redis.ports.clone() {
                redis.wait_until("the cluster is formed", |r| {
                    r.cli(port, &["CLUSTER", "INFO"])
                        .is_some_and(|out| out.contains("cluster_state:ok"))
                });
            }
        }
        redis
    }

    /// `redis-cli` over TLS as the test's user; its output, if it succeeded.
    fn cli(&self, port: u16, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["--tls", "--cacert", &self.pki.file("ca.pem")])
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["--user", USER, "--pass", PASSWORD, "--no-auth-warning"])
            .args(args)
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success() && !text.starts_with("ERR") && !text.contains("NOAUTH"))
            .then_some(text)
    }

    fn wait_until(&self, what: &str, check: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !check(self) {
            assert!(Instant::now() < deadline, "{what}: not within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|port| format!("rediss://127.0.0.1:{port}"))
            .collect()
    }

    /// What a deployment would set: the `rediss://` URLs, the user, its
    /// password and the CA.
    fn settings(&self, cluster: bool, access: RedisAccess) -> RedisSettings {
        let urls = self.urls();
        RedisSettings {
            url: urls[0].clone(),
            retention: Duration::from_secs(3600),
            cluster_nodes: if cluster { urls } else { Vec::new() },
            sales_key: settings::sales_key("redis-tls"),
            access,
        }
    }

    fn access(&self) -> RedisAccess {
        RedisAccess {
            username: Some(USER.to_owned()),
            password: Some(PASSWORD.to_owned()),
            ca_file: Some(self.pki.file("ca.pem")),
        }
    }
}

fn request(sku: &Sku, user: &str) -> PurchaseRequest {
    PurchaseRequest {
        v: SCHEMA_VERSION,
        request_id: RequestId::fresh(),
        sku: sku.clone(),
        user_id: UserId::parse(user).unwrap(),
        quantity: Quantity::new(1).unwrap(),
        accepted_at_ms: 0,
    }
}

/// A sale of 3 units over `conn`: 4 buyers, 3 reserved and committed, the
/// fourth sold out; the counters say so.
async fn sell_out(conn: RedisConn, settings: &RedisSettings) {
    let store = StockStore::new(conn, settings);
    let sku = Sku::parse(&format!("tls-{}", uuid::Uuid::now_v7().simple())).unwrap();
    let rules = SaleRules {
        sale_id: uuid::Uuid::now_v7().to_string(),
        total: 3,
        per_user_limit: 1,
        price_cents: 250,
        reservation_ttl_ms: 60_000,
        starts_at_ms: 0,
        ends_at_ms: FOREVER,
        overbook: 1.0,
    };
    assert_eq!(
        store.open_sale(&sku, &rules).await.unwrap(),
        OpenOutcome::Opened
    );
    let mut reserved = Vec::new();
    for user in ["ada", "bo", "cy", "di"] {
        let record = request(&sku, user);
        match store
            .reserve(&record, 1_000, FOREVER)
            .await
            .unwrap()
            .outcome
        {
            ReserveOutcome::Reserved { .. } => reserved.push(record.request_id),
            other => assert_eq!(user, "di", "{user}: {other:?}"),
        }
    }
    assert_eq!(reserved.len(), 3);
    for id in reserved {
        let committed = store.commit(&sku, id, 2_000).await.unwrap().outcome;
        assert_eq!(committed, CommitOutcome::Committed);
    }
    let levels = store.levels(&sku).await.unwrap().expect("the sale's stock");
    assert_eq!((levels.sold, levels.reserved), (3, 0), "{levels:?}");
}

async fn refused(settings: &RedisSettings) -> String {
    let attempt = tokio::time::timeout(Duration::from_secs(20), async {
        let mut conn = redis_conn::connect(settings).await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    })
    .await
    .expect("an answer, not a hang");
    match attempt {
        Ok(pong) => panic!("connected with {:?}: {pong}", settings.access),
        Err(error) => error.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_runs_on_a_single_redis_over_tls_as_an_acl_user() {
    let redis = TlsRedis::start("single", 1, false);
    let settings = redis.settings(false, redis.access());
    let conn = redis_conn::connect(&settings).await.unwrap();
    sell_out(conn, &settings).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_runs_on_a_cluster_over_tls_as_an_acl_user() {
    let redis = TlsRedis::start("cluster", 3, true);
    let settings = redis.settings(true, redis.access());
    let conn = redis_conn::connect(&settings).await.unwrap();
    // Sales on several skus land on several masters.
    for _ in 0..6 {
        sell_out(conn.clone(), &settings).await;
    }

    let system_roots = redis.settings(
        true,
        RedisAccess {
            ca_file: None,
            ..redis.access()
        },
    );
    let error = refused(&system_roots).await;
    assert!(error.to_lowercase().contains("certificate"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_redis_refuses_an_unknown_ca_a_wrong_password_and_plain_text() {
    let redis = TlsRedis::start("refusals", 1, false);

    let system_roots = redis.settings(
        false,
        RedisAccess {
            ca_file: None,
            ..redis.access()
        },
    );
    let error = refused(&system_roots).await;
    assert!(
        error.to_lowercase().contains("certificate"),
        "a server the system's roots do not vouch for: {error}"
    );

    let wrong_password = redis.settings(
        false,
        RedisAccess {
            password: Some("not-the-password".to_owned()),
            ..redis.access()
        },
    );
    let error = refused(&wrong_password).await;
    assert!(
        error.to_lowercase().contains("authentication failed"),
        "{error}"
    );

    let no_user = redis.settings(
        false,
        RedisAccess {
            username: None,
            password: None,
            ..redis.access()
        },
    );
    let error = refused(&no_user).await;
    assert!(error.contains("NOAUTH"), "the default user is off: {error}");

    let mut plain = redis.settings(false, RedisAccess::default());
    plain.url = plain.url.replace("rediss://", "redis://");
    refused(&plain).await;

    let missing_ca = redis.settings(
        false,
        RedisAccess {
            ca_file: Some(redis.dir.join("no-such.pem").to_string_lossy().into()),
            ..redis.access()
        },
    );
    let error = refused(&missing_ca).await;
    assert!(error.contains("FLASHSALE_REDIS_CA_FILE"), "{error}");
}

/// The gateway's second connection to Redis, its subscription to flag and
/// status changes (what wakes long polls and shuts a sold-out sku's door
/// without a Redis call), goes over TLS as the same user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_follows_flags_over_tls_as_an_acl_user() {
    let redis = TlsRedis::start("gateway", 1, false);
    let access = redis.access();
    let addr = format!("127.0.0.1:{}", free_port().unwrap());
    let env = env_with(&[
        ("FLASHSALE_REDIS_URL", redis.urls()[0].clone()),
        ("FLASHSALE_REDIS_CLUSTER_NODES", String::new()),
        ("FLASHSALE_REDIS_USERNAME", USER.to_owned()),
        ("FLASHSALE_REDIS_PASSWORD", PASSWORD.to_owned()),
        ("FLASHSALE_REDIS_CA_FILE", access.ca_file.clone().unwrap()),
        (
            "FLASHSALE_TOPIC_PREFIX",
            format!("tls-{}.", uuid::Uuid::now_v7().simple()),
        ),
        ("FLASHSALE_GATEWAY_ADDR", addr.clone()),
    ]);
    let gateway = Command::new(service_binary("gateway"))
        .envs(env.vars())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _gateway = flashsale_testkit::ServiceProcess::from(gateway);

    flashsale_testkit::eventually(
        "the gateway subscribed to flag changes",
        Duration::from_secs(30),
        || {
            let url = format!("http://{addr}/metrics");
            async move {
                let text = reqwest::get(url).await.ok()?.text().await.ok()?;
                text.lines()
                    .any(|line| line == "gateway_flags_subscribed 1")
                    .then_some(())
            }
        },
    )
    .await;
}
