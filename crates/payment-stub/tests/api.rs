//! The stub's API behaves like a card processor's: idempotent charges,
//! refusal of a reused key, idempotent refunds, run-time behaviour.

use std::net::SocketAddr;

use flashsale_core::payment::StubBehaviour;
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
            send(request, &json!({"decline_rate": rate, "latency_ms": 0}))
                .await
                .0
        }
    };
    assert_eq!(behaviour(0.0).await, 200);
    let (status, _) = charge(&base, Some("k-3"), &charge_body(100)).await;
    assert_eq!(status, 201);
    assert_eq!(behaviour(2.0).await, 422);
    shutdown.cancel();
}
