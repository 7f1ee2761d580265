//! The ceiling `scripts/bench-gateway` measures the gateway against: the
//! same axum and tokio set-up, the same body limit, the same JSON parsed
//! into the same `PurchaseBody`, and a 202 of the same shape, with nothing
//! in between (no validation, Redis or Kafka).
//!
//!   FLASHSALE_NOOP_ADDR=127.0.0.1:18090 cargo bench -p flashsale-gateway --bench noop

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark stops at its first failure

use axum::extract::DefaultBodyLimit;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use flashsale_gateway::PurchaseBody;

async fn accept(Json(body): Json<PurchaseBody>) -> impl IntoResponse {
    // Read the fields, as the gateway does, so none is optimised away.
    std::hint::black_box((&body.sku, &body.user_id, body.quantity));
    let id = uuid::Uuid::now_v7();
    let status_url = format!("/v1/purchases/{id}");
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, status_url.clone())],
        Json(serde_json::json!({
            "request_id": id.to_string(),
            "status": "queued",
            "status_url": status_url,
        })),
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::var("FLASHSALE_NOOP_ADDR").unwrap_or_else(|_| "127.0.0.1:18090".into());
    let app = Router::new()
        .route("/v1/purchases", post(accept))
        .layer(DefaultBodyLimit::max(4096));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("noop purchase server on {addr}");
    axum::serve(listener, app).await?;
    Ok(())
}
