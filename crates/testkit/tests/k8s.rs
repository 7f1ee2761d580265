//! The Kubernetes manifests (`infra/k8s`) against what the services do
//! with the settings they give them: each worker's ScaledObject reads the
//! lag of the group and topic that worker consumes, on the brokers it
//! uses, and never scales it past the partitions of its topic; each
//! service starts its configuration from the manifest's settings alone.
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

fn render_now(variant: &str) -> Vec<Value> {
    let out = std::process::Command::new(repo().join("scripts/check-infra"))
        .args(["--render", variant])
        .output()
        .expect("scripts/check-infra runs");
    assert!(
        out.status.success(),
        "rendering {variant}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name}"))
}

/// The settings a Deployment's container runs with: its ConfigMaps and its
/// own `env`, as the service reads them.
fn settings_of(objects: &[Value], deployment: &Value) -> Env {
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let mut vars = HashMap::new();
    for source in container["envFrom"].as_array().into_iter().flatten() {
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
    vars.retain(|name, _| name.starts_with("FLASHSALE_"));
    Env::from_map(vars)
}

/// What a worker's configuration, read from its manifest, consumes.
struct Consumes {
    bootstrap: String,
    partitions: i64,
    group: String,
    topic: String,
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
