//! The stub's API behaves like a card processor's: idempotent charges,
//! refusal of a reused key, idempotent refunds, run-time behaviour; it
//! remembers across a restart, and fails the ways processors fail.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure here is the test's answer

use std::net::SocketAddr;

use std::time::Duration;

use flashsale_core::ids::RequestId;
use flashsale_core::payment::{
    ChargeMetadata, ChargeOutcome, ChargeRequest, PaymentClient, PaymentError, StubBehaviour,
};
use flashsale_payment_stub::{Config, start};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

async fn stub(decline_rate: f64) -> (String, CancellationToken) {
    let shutdown = CancellationToken::new();
    let config = Config {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        behaviour: StubBehaviour::simple(decline_rate, 0),
        ledger: None,
    };
    let running = start(config, shutdown.clone()).await.expect("stub starts");
    (format!("http://{}", running.local_addr), shutdown)
}

fn charge_body(amount: u64) -> Value {
    json!({"amount_cents": amount, "currency": "EUR",
           "metadata": {"order_id": "o-1", "sku": "tv", "sale_id": "s-1"}})
}

/// Sends a request with a JSON body; the status and the JSON answer.
async fn send(request: reqwest::RequestBuilder, body: &Value) -> (u16, Value) {
    let response = request.json(body).send().await.expect("the stub answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn charge(base: &str, key: Option<&str>, body: &Value) -> (u16, Value) {
    let mut request = reqwest::Client::new().post(format!("{base}/v1/charges"));
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    send(request, body).await
}

async fn refund(base: &str, charge_id: &Value) -> (u16, Value) {
    let request = reqwest::Client::new().post(format!("{base}/v1/refunds"));
    send(request, &json!({"charge_id": charge_id})).await
}

async fn get(url: String) -> Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

#[tokio::test]
async fn a_charge_is_idempotent_by_key_and_a_reused_key_is_refused() {
    let (base, shutdown) = stub(0.0).await;
    let (first_status, first) = charge(&base, Some("k-1"), &charge_body(1999)).await;
    let (again_status, again) = charge(&base, Some("k-1"), &charge_body(1999)).await;
    assert_eq!((first_status, again_status), (201, 201));
    assert_eq!(
        first["id"], again["id"],
        "a replay returns the first charge"
    );
    let (reused, problem) = charge(&base, Some("k-1"), &charge_body(5)).await;
    assert_eq!(reused, 422);
    assert_eq!(problem["type"], "idempotency-key-reused");
    let (missing, _) = charge(&base, None, &charge_body(1)).await;
    assert_eq!(missing, 400);

    let listed = get(format!("{base}/v1/charges?sale_id=s-1")).await;
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(1),
        "one charge however often it was asked for"
    );

    let (s1, r1) = refund(&base, &first["id"]).await;
    let (s2, r2) = refund(&base, &first["id"]).await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(r1, r2, "a refund is idempotent");
    let after = get(format!(
        "{base}/v1/charges/{}",
        first["id"].as_str().unwrap()
    ))
    .await;
    assert_eq!(after["refunded"], true);
    shutdown.cancel();
}

#[tokio::test]
async fn declines_are_402_and_cannot_be_refunded_and_the_rate_changes_at_run_time() {
    let (base, shutdown) = stub(1.0).await;
    let (status, declined) = charge(&base, Some("k-2"), &charge_body(100)).await;
    assert_eq!(status, 402);
    assert_eq!(declined["status"], "declined");
    let (status, _) = refund(&base, &declined["id"]).await;
    assert_eq!(status, 422);

    let behaviour = |rate: f64| {
        let request = reqwest::Client::new().put(format!("{base}/admin/behaviour"));
        async move {
            let wanted = json!({"decline_rate": rate, "latency": {"kind": "fixed", "ms": 0}});
            send(request, &wanted).await.0
        }
    };
    assert_eq!(behaviour(0.0).await, 200);
    let (status, _) = charge(&base, Some("k-3"), &charge_body(100)).await;
    assert_eq!(status, 201);
    assert_eq!(behaviour(2.0).await, 422);
    shutdown.cancel();
}

async fn stub_with(behaviour: StubBehaviour, ledger: Option<std::path::PathBuf>) -> Running {
    let shutdown = CancellationToken::new();
    let config = Config {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        behaviour,
        ledger,
    };
    let running = start(config, shutdown.clone()).await.expect("stub starts");
    Running {
        base: format!("http://{}", running.local_addr),
        shutdown,
        task: running.task,
    }
}

struct Running {
    base: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task
            .await
            .expect("stub task")
            .expect("stub stopped cleanly");
    }
}

fn ledger_path(name: &str) -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("flashsale-stub-{}", uuid::Uuid::now_v7().simple()));
    dir.join(format!("{name}.jsonl"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_stub_remembers_every_charge_and_refund() {
    let path = ledger_path("restart");
    let first = stub_with(StubBehaviour::simple(0.0, 0), Some(path.clone())).await;
    let (_, kept) = charge(&first.base, Some("k-kept"), &charge_body(100)).await;
    let (_, refunded) = charge(&first.base, Some("k-refunded"), &charge_body(200)).await;
    assert_eq!(refund(&first.base, &refunded["id"]).await.0, 200);
    first.stop().await;

    let again = stub_with(StubBehaviour::simple(0.0, 0), Some(path.clone())).await;
    let (status, replayed) = charge(&again.base, Some("k-kept"), &charge_body(100)).await;
    assert_eq!(
        (status, &replayed["id"]),
        (201, &kept["id"]),
        "the same charge, not a new one"
    );
    let (reused, _) = charge(&again.base, Some("k-kept"), &charge_body(999)).await;
    assert_eq!(reused, 422, "the first body is remembered too");
    let after = get(format!(
        "{}/v1/charges/{}",
        again.base,
        refunded["id"].as_str().unwrap()
    ))
    .await;
    assert_eq!(after["refunded"], true);
    let (_, fresh) = charge(&again.base, Some("k-new"), &charge_body(300)).await;
    assert_ne!(fresh["id"], kept["id"]);
    assert_ne!(fresh["id"], refunded["id"]);
    let by_key = get(format!(
        "{}/v1/charges?idempotency_key=k-refunded",
        again.base
    ))
    .await;
    assert_eq!(by_key[0]["id"], refunded["id"]);
    again.stop().await;
    let _ = std::fs::remove_dir_all(path.parent().expect("a directory"));
}

fn order_charge() -> ChargeRequest {
    ChargeRequest {
        amount_cents: 1999,
        currency: "EUR".into(),
        metadata: ChargeMetadata {
            order_id: "o-9".into(),
            sku: "tv".into(),
            sale_id: "s-9".into(),
        },
    }
}

/// An error did nothing, so a retry may charge; a timed-out charge was made
/// and is found by its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_charge_nothing_and_a_timed_out_charge_is_found_by_its_key() {
    let mut behaviour = StubBehaviour::simple(0.0, 0);
    behaviour.error_rate = 1.0;
    let stub = stub_with(behaviour.clone(), None).await;
    let client = PaymentClient::new(&stub.base, Duration::from_millis(300));
    let key = RequestId::fresh();
    for _ in 0..5 {
        let failed = client.charge(key, &order_charge()).await;
        assert!(
            matches!(failed, Err(PaymentError::Transient(_))),
            "{failed:?}"
        );
    }
    behaviour.error_rate = 0.0;
    client.set_behaviour(&behaviour).await.unwrap();
    assert!(
        client.find_charge(key).await.unwrap().is_none(),
        "an error charged nothing"
    );

    behaviour.timeout_rate = 1.0;
    behaviour.hang_ms = 5_000;
    client.set_behaviour(&behaviour).await.unwrap();
    let hung = RequestId::fresh();
    let timed_out = client.charge(hung, &order_charge()).await;
    assert!(
        matches!(timed_out, Err(PaymentError::Transient(_))),
        "{timed_out:?}"
    );
    let found = client
        .find_charge(hung)
        .await
        .unwrap()
        .expect("the charge was made");
    behaviour.timeout_rate = 0.0;
    client.set_behaviour(&behaviour).await.unwrap();
    match client.charge(hung, &order_charge()).await.unwrap() {
        ChargeOutcome::Succeeded(again) => assert_eq!(again.id, found.id, "a retry replays it"),
        other => panic!("{other:?}"),
    }
    stub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_answers_503_until_it_ends_and_bad_behaviour_is_refused() {
    let mut behaviour = StubBehaviour::simple(0.0, 0);
    behaviour.outage = true;
    let stub = stub_with(behaviour.clone(), None).await;
    let (status, problem) = charge(&stub.base, Some("k-out"), &charge_body(100)).await;
    assert_eq!((status, problem["type"].as_str()), (503, Some("outage")));
    let client = PaymentClient::new(&stub.base, Duration::from_secs(2));
    behaviour.outage = false;
    client.set_behaviour(&behaviour).await.unwrap();
    let (status, _) = charge(&stub.base, Some("k-out"), &charge_body(100)).await;
    assert_eq!(status, 201);
    let request = reqwest::Client::new().put(format!("{}/admin/behaviour", stub.base));
    let wrong = json!({"decline_rate": 0.0, "latency": {"kind": "log_normal", "p50_ms": 50.0, "p99_ms": 10.0}});
    assert_eq!(send(request, &wrong).await.0, 422);
    stub.stop().await;
}
