//! The stub's API behaves like a card processor's: idempotent charges,
//! refusal of a reused key, idempotent refunds, run-time behaviour.

use std::net::SocketAddr;

use flashsale_core::payment::{ChargeStatus, StubBehaviour};
use flashsale_payment_stub::{Config, start};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

async fn stub(decline_rate: f64) -> (String, CancellationToken) {
    let shutdown = CancellationToken::new();
    let config = Config {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        behaviour: StubBehaviour {
            decline_rate,
            latency_ms: 0,
        },
    };
    let running = start(config, shutdown.clone()).await.expect("stub starts");
    (format!("http://{}", running.local_addr), shutdown)
}

fn charge_body(amount: u64) -> Value {
    json!({"amount_cents": amount, "currency": "EUR",
           "metadata": {"order_id": "o-1", "sku": "tv", "sale_id": "s-1"}})
}

#[tokio::test]
async fn a_charge_is_idempotent_by_key_and_a_reused_key_is_refused() {
    let (base, shutdown) = stub(0.0).await;
    let http = reqwest::Client::new();
    let charge = |key: &'static str, body: Value| {
        let http = http.clone();
        let url = format!("{base}/v1/charges");
        async move {
            let r = http
                .post(url)
                .header("Idempotency-Key", key)
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (first_status, first) = charge("k-1", charge_body(1999)).await;
    let (again_status, again) = charge("k-1", charge_body(1999)).await;
    assert_eq!((first_status, again_status), (201, 201));
    assert_eq!(
        first["id"], again["id"],
        "a replay returns the first charge"
    );
    let (reused, problem) = charge("k-1", charge_body(5)).await;
    assert_eq!(reused, 422);
    assert_eq!(problem["type"], "idempotency-key-reused");
    let missing = http
        .post(format!("{base}/v1/charges"))
        .json(&charge_body(1))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status().as_u16(), 400);

    let listed: Vec<Value> = http
        .get(format!("{base}/v1/charges?sale_id=s-1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed.len(), 1, "one charge however often it was asked for");

    let id = first["id"].as_str().unwrap();
    let refund = |http: reqwest::Client| {
        let url = format!("{base}/v1/refunds");
        async move {
            http.post(url)
                .json(&json!({"charge_id": id}))
                .send()
                .await
                .unwrap()
        }
    };
    let r1: Value = refund(http.clone()).await.json().await.unwrap();
    let r2: Value = refund(http.clone()).await.json().await.unwrap();
    assert_eq!(r1, r2, "a refund is idempotent");
    let after: Value = http
        .get(format!("{base}/v1/charges/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(after["refunded"], true);
    shutdown.cancel();
}

#[tokio::test]
async fn declines_are_402_and_cannot_be_refunded_and_the_rate_changes_at_run_time() {
    let (base, shutdown) = stub(1.0).await;
    let http = reqwest::Client::new();
    let declined = http
        .post(format!("{base}/v1/charges"))
        .header("Idempotency-Key", "k-2")
        .json(&charge_body(100))
        .send()
        .await
        .unwrap();
    assert_eq!(declined.status().as_u16(), 402);
    let charge: flashsale_core::payment::Charge = declined.json().await.unwrap();
    assert_eq!(charge.status, ChargeStatus::Declined);
    let refund = http
        .post(format!("{base}/v1/refunds"))
        .json(&json!({"charge_id": charge.id}))
        .send()
        .await
        .unwrap();
    assert_eq!(refund.status().as_u16(), 422);

    let changed = http
        .put(format!("{base}/admin/behaviour"))
        .json(&json!({"decline_rate": 0.0, "latency_ms": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status().as_u16(), 200);
    let ok = http
        .post(format!("{base}/v1/charges"))
        .header("Idempotency-Key", "k-3")
        .json(&charge_body(100))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 201);
    let invalid = http
        .put(format!("{base}/admin/behaviour"))
        .json(&json!({"decline_rate": 2.0, "latency_ms": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(invalid.status().as_u16(), 422);
    shutdown.cancel();
}
