//! The Kubernetes manifests (`infra/k8s`) against what the services do
//! with the settings they give them: each worker's ScaledObject reads the
//! lag of the group and topic that worker consumes, on the brokers it
//! uses, and never scales it past the partitions of its topic; each
//! service starts from the manifest's settings alone, each pod is given
//! longer to stop than its service takes, and every metric an alert reads
//! is exported from the start.
//! The schemas themselves are `scripts/check-infra`'s (run by
//! `./scripts/test`); this renders through it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure here is the test's answer

use std::collections::HashMap;
use std::path::PathBuf;

use flashsale_testkit::flashsale_core::service::settings::Env;
use serde_json::Value;

const VARIANTS: [&str; 3] = ["base", "overlays/local", "overlays/local-prometheus"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The objects of `variant`, rendered once for all the tests here.
fn render(variant: &str) -> Vec<Value> {
    static RENDERED: std::sync::LazyLock<HashMap<&str, Vec<Value>>> =
        std::sync::LazyLock::new(|| VARIANTS.into_iter().map(|v| (v, render_now(v))).collect());
    RENDERED[variant].clone()
}

/// What `scripts/check-infra` with `args` prints.
fn check_infra(args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new(repo().join("scripts/check-infra"))
        .args(args)
        .output()
        .expect("scripts/check-infra runs");
    assert!(
        out.status.success(),
        "check-infra {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Every query the alerts and the dashboard of `overlays/local-prometheus`
/// ask (`check-infra --queries`): what asks it, `expr`, the `metrics` read.
fn queries() -> Vec<Value> {
    serde_json::from_slice(&check_infra(&["--queries", "overlays/local-prometheus"])).expect("JSON")
}

fn render_now(variant: &str) -> Vec<Value> {
    serde_json::from_slice(&check_infra(&["--render", variant])).expect("JSON")
}

fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name}"))
}

/// The settings a Deployment's container runs with, as the service reads
/// them.
fn settings_of(objects: &[Value], deployment: &Value) -> Env {
    let mut vars = environment_of(objects, deployment);
    vars.retain(|name, _| name.starts_with("FLASHSALE_"));
    Env::from_map(vars)
}

/// A Deployment's container's whole environment: its ConfigMaps and its
/// own `env`.
fn environment_of(objects: &[Value], deployment: &Value) -> HashMap<String, String> {
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let mut vars = HashMap::new();
    for source in container["envFrom"].as_array().into_iter().flatten() {
        if let Some(secret) = source["secretRef"]["name"].as_str() {
            // Not in the manifests (the operator creates it): a pod must
            // start without it.
            assert_eq!(source["secretRef"]["optional"], true, "secret {secret}");
            continue;
        }
        let map = named(
            objects,
            "ConfigMap",
            source["configMapRef"]["name"].as_str().unwrap(),
        );
        for (key, value) in map["data"].as_object().unwrap() {
            vars.insert(key.clone(), value.as_str().unwrap().to_owned());
        }
    }
    for var in container["env"].as_array().into_iter().flatten() {
        vars.insert(
            var["name"].as_str().unwrap().to_owned(),
            var["value"].as_str().unwrap().to_owned(),
        );
    }
    vars
}

/// What a worker's configuration, read from its manifest, consumes.
struct Consumes {
    bootstrap: String,
    partitions: i64,
    group: String,
    topic: String,
    topics: Vec<String>,
}

fn consumes(worker: &str, env: &Env) -> Consumes {
    let (kafka, (group, topics)) = match worker {
        "shop-worker" => {
            let config = flashsale_shop_worker::Config::from_env(env).expect("shop settings");
            (config.kafka.clone(), config.subscription())
        }
        "order-worker" => {
            let config = flashsale_order_worker::Config::from_env(env).expect("order settings");
            (config.kafka.clone(), config.subscription())
        }
        other => panic!("no worker {other}"),
    };
    Consumes {
        bootstrap: kafka.bootstrap,
        partitions: i64::from(kafka.partitions),
        group,
        // The topic whose lag says buyers wait: the first one read.
        topic: topics[0].clone(),
        topics,
    }
}

#[test]
fn each_scaled_object_reads_the_lag_of_what_its_worker_consumes() {
    for variant in VARIANTS {
        let objects = render(variant);
        let scaled: Vec<&Value> = objects
            .iter()
            .filter(|o| o["kind"] == "ScaledObject")
            .collect();
        assert_eq!(scaled.len(), 2, "{variant}: one per worker");
        for object in scaled {
            let target = object["spec"]["scaleTargetRef"]["name"].as_str().unwrap();
            let deployment = named(&objects, "Deployment", target);
            let command = deployment["spec"]["template"]["spec"]["containers"][0]["command"][0]
                .as_str()
                .unwrap();
            assert!(
                command.ends_with(&format!("/{target}")),
                "{variant}: {target} runs {command}"
            );
            let worker = consumes(target, &settings_of(&objects, deployment));
            let max = object["spec"]["maxReplicaCount"].as_i64().unwrap();
            assert!(
                max <= worker.partitions,
                "{variant}: {target} scales to {max} on {} partitions",
                worker.partitions
            );
            for trigger in object["spec"]["triggers"].as_array().unwrap() {
                let meta = &trigger["metadata"];
                match trigger["type"].as_str().unwrap() {
                    "kafka" => {
                        assert_eq!(meta["consumerGroup"], worker.group.as_str(), "{variant}");
                        assert_eq!(meta["topic"], worker.topic.as_str(), "{variant}");
                        assert_eq!(
                            meta["bootstrapServers"],
                            worker.bootstrap.as_str(),
                            "{variant}"
                        );
                    }
                    "prometheus" => {
                        let query = meta["query"].as_str().unwrap();
                        for label in [
                            format!("group=\"{}\"", worker.group),
                            format!("topic=\"{}\"", worker.topic),
                        ] {
                            assert!(query.contains(&label), "{variant}: {query} lacks {label}");
                        }
                    }
                    other => panic!("{variant}: unexpected trigger {other}"),
                }
            }
        }
    }
}

/// A consumer group or topic an alert or a dashboard panel names is one a
/// worker of the same variant reads: a renamed one would leave it watching
/// nothing.
#[test]
fn each_group_and_topic_an_alert_or_panel_names_is_one_a_worker_reads() {
    let objects = render("overlays/local-prometheus");
    let (mut groups, mut topics) = (Vec::new(), Vec::new());
    for worker in ["shop-worker", "order-worker"] {
        let deployment = named(&objects, "Deployment", worker);
        let reads = consumes(worker, &settings_of(&objects, deployment));
        groups.push(reads.group);
        topics.extend(reads.topics);
    }
    let mut named_count = 0;
    for query in queries() {
        let (what, expr) = (&query["what"], query["expr"].as_str().unwrap());
        for (label, known) in [("group", &groups), ("topic", &topics)] {
            let matcher = format!("{label}=\"");
            for (at, _) in expr.match_indices(&matcher) {
                let value = expr[at + matcher.len()..].split('"').next().unwrap();
                assert!(
                    known.iter().any(|k| k == value),
                    "{what}: {label} {value} is none of {known:?}"
                );
                named_count += 1;
            }
        }
    }
    assert!(named_count >= 2, "nothing names a group or a topic");
}

#[test]
fn every_service_reads_its_settings_from_the_manifests_alone() {
    for variant in VARIANTS {
        let objects = render(variant);
        for deployment in objects.iter().filter(|o| o["kind"] == "Deployment") {
            let env = settings_of(&objects, deployment);
            let name = deployment["metadata"]["name"].as_str().unwrap();
            let listens = match name {
                "gateway" => flashsale_gateway::Config::from_env(&env).map(|c| c.addr),
                "shop-worker" => {
                    flashsale_shop_worker::Config::from_env(&env).map(|c| c.metrics_addr)
                }
                "order-worker" => {
                    flashsale_order_worker::Config::from_env(&env).map(|c| c.metrics_addr)
                }
                "payment-stub" => flashsale_payment_stub::Config::from_env(&env).map(|c| c.addr),
                other => panic!("{variant}: a Deployment of no service: {other}"),
            }
            .unwrap_or_else(|e| panic!("{variant}: {name}'s settings: {e}"));
            // Reachable by its probes and its Service: on every interface,
            // on the port the manifest names.
            let port = deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]
                ["containerPort"]
                .as_u64()
                .unwrap();
            assert_eq!(
                (listens.ip().is_unspecified(), u64::from(listens.port())),
                (true, port),
                "{variant}: {name} listens on {listens}"
            );
        }
    }
}

/// The binaries the workspace builds, but the chaos campaign's (it drives
/// the local stack, not a cluster).
fn service_binaries() -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(repo().join("crates")).unwrap() {
        let manifest = std::fs::read_to_string(entry.unwrap().path().join("Cargo.toml")).unwrap();
        let mut lines = manifest.lines();
        while let Some(line) = lines.next() {
            if line.trim() == "[[bin]]"
                && let Some(name) = lines.next().and_then(|l| l.trim().strip_prefix("name = "))
            {
                names.push(name.trim_matches('"').to_owned());
            }
        }
    }
    names.retain(|n| n != "flashsale-chaos");
    names.sort();
    names
}

#[test]
fn the_image_carries_every_service_binary_and_what_they_link() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let mut copied: Vec<String> = dockerfile
        .split_whitespace()
        .filter_map(|word| word.strip_prefix("target/release/"))
        .map(str::to_owned)
        .collect();
    copied.sort();
    assert_eq!(copied, service_binaries(), "the Dockerfile's binaries");

    for variant in VARIANTS {
        for object in render(variant) {
            let Some(command) =
                object["spec"]["template"]["spec"]["containers"][0]["command"][0].as_str()
            else {
                continue;
            };
            let binary = command.strip_prefix("/usr/local/bin/").unwrap_or(command);
            assert!(
                copied.iter().any(|b| b == binary),
                "{variant}: {command} is not in the image"
            );
        }
    }

    // The runtime stage (distroless/cc) has glibc, libm and libgcc_s; the
    // Dockerfile copies libz. Anything else a binary links would be missing.
    let provided = [
        "linux-vdso.so.1",
        "libc.so.6",
        "libm.so.6",
        "libgcc_s.so.1",
        "ld-linux-x86-64.so.2",
        "libz.so.1",
    ];
    assert!(
        dockerfile.contains("libz.so.1"),
        "the Dockerfile copies libz"
    );
    for binary in &copied {
        let ldd = std::process::Command::new("ldd")
            .arg(flashsale_testkit::service_binary(binary))
            .output()
            .expect("ldd runs");
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            let library = line.split_whitespace().next().unwrap_or_default();
            let file = library.rsplit('/').next().unwrap_or(library);
            assert!(
                provided.contains(&file),
                "{binary} links {library}, which the image lacks"
            );
        }
    }
}

/// The settings that say where the parts are (and where the payment
/// stub keeps its ledger): the only ones the next test changes, to the test
/// stack's, each where the manifest has it.
fn test_stack_addresses(ledger: &std::path::Path) -> [(&'static str, String); 6] {
    let var =
        |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name}: run ./scripts/test"));
    [
        (
            "FLASHSALE_KAFKA_BOOTSTRAP",
            var("FLASHSALE_KAFKA_BOOTSTRAP"),
        ),
        // The base's Redis is a cluster, as is the test stack's second one;
        // the local overlay's a single one.
        (
            "FLASHSALE_REDIS_CLUSTER_NODES",
            var("FLASHSALE_TEST_REDIS_CLUSTER_NODES"),
        ),
        ("FLASHSALE_REDIS_URL", var("FLASHSALE_REDIS_URL")),
        (
            "FLASHSALE_DYNAMODB_ENDPOINT",
            var("FLASHSALE_DYNAMODB_ENDPOINT"),
        ),
        ("FLASHSALE_PAYMENT_URL", "http://127.0.0.1:9".to_owned()),
        (
            "FLASHSALE_PAYMENT_LEDGER",
            ledger.to_string_lossy().into_owned(),
        ),
    ]
}

/// The HTTP status of `GET path` on `addr`, if it answers.
fn http_status(addr: &str, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    answer.split_whitespace().nth(1)?.parse().ok()
}

/// Each service binary, started with an empty environment but for its
/// Deployment's (the base's: a Redis Cluster, 12 partitions, real
/// DynamoDB's settings; the local overlay's: one Redis, the payment stub),
/// where only the parts' addresses are the test stack's, becomes ready: it
/// needs no setting the manifests do not give.
#[test]
fn every_service_becomes_ready_on_its_manifest_settings_alone() {
    for variant in ["base", "overlays/local"] {
        services_become_ready(variant);
    }
}

fn services_become_ready(variant: &str) {
    let objects = render(variant);
    let prefix = format!("k8s-{}.", uuid::Uuid::now_v7().simple());
    let ledger = std::env::temp_dir().join(format!("{prefix}ledger.jsonl"));
    let mut services = Vec::new();
    for deployment in objects.iter().filter(|o| o["kind"] == "Deployment") {
        let name = deployment["metadata"]["name"].as_str().unwrap().to_owned();
        let mut vars = environment_of(&objects, deployment);
        let mut replaced = Vec::new();
        for (setting, address) in test_stack_addresses(&ledger) {
            if vars.contains_key(setting) {
                vars.insert(setting.to_owned(), address);
                replaced.push(setting);
            }
        }
        if name != "payment-stub" {
            // Each part it uses is the test stack's, none left pointing
            // at a cluster's names.
            for part in ["KAFKA_BOOTSTRAP", "REDIS_", "DYNAMODB_ENDPOINT"] {
                assert!(
                    replaced.iter().any(|s| s.contains(part)),
                    "{variant}: {name} has no {part} to replace: {replaced:?}"
                );
            }
        }
        // Its own topics and groups, apart from the other tests'.
        vars.insert("FLASHSALE_TOPIC_PREFIX".to_owned(), prefix.clone());
        // Where it listens: the manifest's port is every pod's, not free here.
        let listen = vars
            .keys()
            .find(|k| k.ends_with("_ADDR"))
            .cloned()
            .unwrap_or_else(|| panic!("{name} names no address to listen on"));
        let addr = format!("127.0.0.1:{}", flashsale_testkit::free_port().unwrap());
        vars.insert(listen, addr.clone());
        let command = deployment["spec"]["template"]["spec"]["containers"][0]["command"][0]
            .as_str()
            .unwrap();
        let binary = command.rsplit('/').next().unwrap();
        let child = std::process::Command::new(flashsale_testkit::service_binary(binary))
            .env_clear()
            .envs(&vars)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        services.push((name, addr, flashsale_testkit::ServiceProcess::from(child)));
    }
    assert!(
        services.len() >= 3,
        "{variant}: gateway, shop-worker, order-worker"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    for (name, addr, process) in &mut services {
        while http_status(addr, "/readyz") != Some(200) {
            assert!(
                process.exited().is_none(),
                "{variant}: {name} exited: {:?}",
                process.exited()
            );
            assert!(
                std::time::Instant::now() < deadline,
                "{variant}: {name} on {addr} not ready within 90 s: /readyz {:?}",
                http_status(addr, "/readyz")
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    let _ = std::fs::remove_file(&ledger);
}

/// Kubernetes kills a container `terminationGracePeriodSeconds` after it
/// starts stopping it, its preStop included: each service must have
/// finished stopping well before, or its in-flight work is cut (and
/// redelivered) on every scale-in and rollout.
#[test]
fn each_pod_is_given_longer_to_stop_than_its_service_takes() {
    use std::time::Duration;

    use flashsale_testkit::flashsale_core::bus::consumer::CLOSE_TIMEOUT;

    for variant in VARIANTS {
        let objects = render(variant);
        for deployment in objects.iter().filter(|o| o["kind"] == "Deployment") {
            let name = deployment["metadata"]["name"].as_str().unwrap();
            let pod = &deployment["spec"]["template"]["spec"];
            // Kubernetes's default when a manifest says nothing.
            let grace =
                Duration::from_secs(pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30));
            let pre_stop = Duration::from_secs(
                pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
                    .as_u64()
                    .unwrap_or(0),
            );
            let env = settings_of(&objects, deployment);
            let stopping = match name {
                // It finishes the requests it holds: a long poll, or a
                // purchase waiting for Kafka.
                "gateway" => {
                    let config = flashsale_gateway::Config::from_env(&env).unwrap();
                    config.max_wait.max(config.request_timeout)
                }
                "shop-worker" => flashsale_shop_worker::DRAIN_TIMEOUT + CLOSE_TIMEOUT,
                "order-worker" => flashsale_order_worker::DRAIN_TIMEOUT + CLOSE_TIMEOUT,
                "payment-stub" => Duration::ZERO,
                other => panic!("{variant}: a Deployment of no service: {other}"),
            };
            assert!(
                grace > pre_stop + stopping,
                "{variant}: {name} gets {grace:?} to stop; its preStop {pre_stop:?} and stopping {stopping:?} need more"
            );
        }
    }
}

/// Every metric the alert rules and the dashboard read
/// (`components/prometheus-alerts`, `components/grafana-dashboard`) is on
/// some service's `/metrics` once a purchase has gone through, and each
/// dead-letter counter is there at 0 from the start for every topic its
/// worker reads: a counter that first appears at 1 has no increase, so an
/// alert on it would never see the first dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_metric_an_alert_or_the_dashboard_reads_is_exported() {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use flashsale_testkit::flashsale_core::bus::kafka::topic;
    use flashsale_testkit::{Pipeline, PipelineOptions, eventually_reads};

    let read: BTreeSet<String> = queries()
        .iter()
        .flat_map(|q| q["metrics"].as_array().unwrap())
        .map(|m| m.as_str().unwrap().to_owned())
        .collect();
    assert!(
        read.len() >= 10,
        "the alerts and the dashboard read {read:?}"
    );

    let p = Pipeline::start(PipelineOptions {
        shop_workers: 1,
        order_workers: 1,
        ..Default::default()
    })
    .await
    .expect("pipeline starts");
    // Every service's samples, as one text.
    let all_samples = async || {
        let mut samples = String::new();
        for base in p.gateway_urls.iter().chain(&p.worker_metrics) {
            samples.push_str(&p.samples(base).await);
        }
        samples
    };

    let zeros = [
        ("shop_dead_letters_total", topic::PURCHASE_REQUESTS),
        ("shop_dead_letters_total", topic::STOCK_RELEASES),
        ("order_dead_letters_total", topic::RESERVATIONS),
    ]
    .map(|(name, base)| format!("{name}{{topic=\"{}\"}} 0", p.kafka.topic(base)));
    eventually_reads(
        "no dead-letter counter missing its 0 before any purchase",
        Duration::from_secs(30),
        async || {
            let samples = all_samples().await;
            zeros
                .iter()
                .filter(|zero| !samples.lines().any(|line| line == zero.as_str()))
                .cloned()
                .collect::<Vec<_>>()
        },
        Vec::is_empty,
    )
    .await;

    // The counters by outcome, state and step appear with their first
    // event; the lag gauges once a worker has partitions and has looked.
    let sku = p.sku("watched");
    p.create_sale(&sku, 5, 1).await.unwrap();
    let (status, body) = p.buy(sku.as_str(), "u-watched", None).await;
    assert_eq!(status, 202, "{body}");
    p.terminal(body["request_id"].as_str().unwrap()).await;
    eventually_reads(
        "no metric read that no service exports",
        Duration::from_secs(60),
        async || {
            let samples = all_samples().await;
            let exported: BTreeSet<&str> = samples
                .lines()
                .filter(|line| !line.starts_with('#'))
                .filter_map(|line| line.split(['{', ' ']).next())
                .collect();
            read.iter()
                .filter(|name| !exported.contains(name.as_str()))
                .cloned()
                .collect::<Vec<_>>()
        },
        Vec::is_empty,
    )
    .await;
}
