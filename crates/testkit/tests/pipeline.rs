//! The whole pipeline against the real local stack: gateway → Kafka →
//! shop-worker (Redis) → Kafka → order-worker (DynamoDB + payment stub).

use std::time::Duration;

use flashsale_testkit::flashsale_core::status::PurchaseStatus;
use flashsale_testkit::{Pipeline, PipelineOptions, eventually};
use serde_json::{Value, json};

const SETTLE: Duration = Duration::from_secs(60);

async fn buy(p: &Pipeline, sku: &str, user: &str, key: Option<&str>) -> (u16, Value) {
    let mut request = p
        .http
        .post(format!("{}/v1/purchases", p.gateway_url))
        .json(&json!({"sku": sku, "user_id": user, "quantity": 1}));
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await.expect("gateway answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn terminal(p: &Pipeline, request_id: &str) -> PurchaseStatus {
    let url = format!("{}/v1/purchases/{request_id}?wait=5", p.gateway_url);
    eventually("a terminal state", SETTLE, || async {
        let status: PurchaseStatus = p.http.get(&url).send().await.ok()?.json().await.ok()?;
        status.status.is_terminal().then_some(status)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_purchase_goes_all_the_way_to_confirmed() {
    let p = Pipeline::start(PipelineOptions::default())
        .await
        .expect("pipeline starts");
    let sku = p.sku("smoke");
    p.create_sale(&sku, 2, 1).await.expect("sale created");
    let (status, body) = buy(&p, sku.as_str(), "alice", None).await;
    assert_eq!(status, 202, "{body}");
    let id = body["request_id"].as_str().expect("request id").to_owned();
    let done = terminal(&p, &id).await;
    assert_eq!(done.status.as_str(), "confirmed", "{done:?}");
    let levels = p.stores.stock.levels(&sku).await.unwrap().unwrap();
    assert_eq!((levels.available, levels.reserved, levels.sold), (1, 0, 1));
    p.stop().await;
}
