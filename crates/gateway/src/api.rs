//! The buyer-facing HTTP API: `POST /v1/purchases`,
//! `GET /v1/purchases/{id}[?wait=S]`, `GET /v1/skus/{sku}`.
//!
//! Every refusal is a problem+json body that names what is wrong; nothing
//! is produced to Kafka unless the purchase is well-formed, for a sku that
//! exists and is not sold out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flashsale_core::clock;
use flashsale_core::dynamo::DynamoError;
use flashsale_core::ids::{IdempotencyKey, Quantity, RequestId, Sku, UserId};
use flashsale_core::kafka;
use flashsale_core::messages::{self, PurchaseRequest, SCHEMA_VERSION};
use flashsale_core::problem::Problem;
use flashsale_core::status::{PurchaseState, PurchaseStatus};
use flashsale_core::status_board::Subject;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::Gateway;

type Shared = Arc<Gateway>;

pub fn router(gateway: Shared, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/purchases", post(create_purchase))
        .route("/v1/purchases/{id}", get(get_purchase))
        .route("/v1/skus/{sku}", get(get_sku))
        .fallback(|| async {
            Problem::new(
                StatusCode::NOT_FOUND,
                "not-found",
                "no such resource; see the README for the API",
            )
        })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "this resource does not accept that method",
            )
        })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(
            gateway.clone(),
            count_responses,
        ))
        .with_state(gateway)
}

async fn count_responses(State(gateway): State<Shared>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let response = next.run(request).await;
    gateway
        .metrics
        .responses
        .with_label_values(&[&route, response.status().as_str()])
        .inc();
    response
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PurchaseBody {
    sku: String,
    user_id: String,
    quantity: i64,
}

#[derive(Serialize)]
struct Accepted {
    request_id: String,
    status: PurchaseState,
    status_url: String,
}

fn invalid(kind: &str, detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::UNPROCESSABLE_ENTITY, kind, detail)
}

fn unavailable(what: &str, error: impl std::fmt::Display) -> Problem {
    tracing::warn!(%error, "{what} unavailable");
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "temporarily-unavailable",
        format!("{what} is unavailable right now; retry with the same Idempotency-Key"),
    )
    .retry_after(1)
}

fn body_problem(rejection: JsonRejection) -> Problem {
    let kind = match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => "body-too-large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported-media-type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid-field",
        _ => "malformed-json",
    };
    Problem::new(rejection.status(), kind, rejection.body_text())
}

async fn create_purchase(
    State(gateway): State<Shared>,
    headers: HeaderMap,
    body: Result<Json<PurchaseBody>, JsonRejection>,
) -> Result<Response, Problem> {
    let shed = |reason: &str, problem: Problem| {
        gateway.metrics.shed.with_label_values(&[reason]).inc();
        problem
    };
    let Json(body) = body.map_err(|r| shed("invalid", body_problem(r)))?;
    let sku = Sku::parse(&body.sku)
        .map_err(|e| shed("invalid", invalid("invalid-sku", e.to_string())))?;
    let user = UserId::parse(&body.user_id)
        .map_err(|e| shed("invalid", invalid("invalid-user-id", e.to_string())))?;
    let quantity = Quantity::new(body.quantity)
        .map_err(|e| shed("invalid", invalid("invalid-quantity", e.to_string())))?;
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(raw) => Some(
            raw.to_str()
                .ok()
                .and_then(|raw| IdempotencyKey::parse(raw).ok())
                .ok_or_else(|| {
                    shed(
                        "invalid",
                        Problem::new(
                            StatusCode::BAD_REQUEST,
                            "invalid-idempotency-key",
                            "Idempotency-Key must be 1 to 255 visible ASCII characters",
                        ),
                    )
                })?,
        ),
    };
    let id = match &key {
        Some(key) => RequestId::derive(&user, key),
        None => RequestId::fresh(),
    };
    let span = tracing::info_span!("purchase", request_id = %id, %sku);
    async {
        if key.is_some() {
            let earlier = gateway
                .board
                .get(id)
                .await
                .map_err(|e| unavailable("the status store", e))?;
            if let Some(earlier) = earlier {
                return repeat(earlier, &sku, quantity);
            }
        }
        match gateway
            .stock
            .sold_out(&sku)
            .await
            .map_err(|e| unavailable("the stock store", e))?
        {
            None => {
                return Err(shed(
                    "invalid",
                    invalid("unknown-sku", format!("there is no sale for sku {sku:?}")),
                ));
            }
            Some(true) => {
                return Err(shed(
                    "sold_out",
                    Problem::new(
                        StatusCode::CONFLICT,
                        "sold-out",
                        format!("{sku} is sold out"),
                    ),
                ));
            }
            Some(false) => {}
        }
        let request = PurchaseRequest {
            v: SCHEMA_VERSION,
            request_id: id,
            sku: sku.clone(),
            user_id: user.clone(),
            quantity,
            accepted_at_ms: clock::now_ms(),
        };
        let started = Instant::now();
        gateway.metrics.in_flight.inc();
        let sent = kafka::send(
            &gateway.producer,
            &gateway.purchase_topic,
            sku.as_str(),
            &messages::encode(&request),
            kafka::trace_headers(id),
            gateway.produce_timeout,
        )
        .await;
        gateway.metrics.in_flight.dec();
        gateway
            .metrics
            .produce_seconds
            .observe(started.elapsed().as_secs_f64());
        sent.map_err(|e| shed("overloaded", unavailable("the purchase queue", e)))?;
        let subject = Subject {
            id,
            sku: &sku,
            user: &user,
            quantity,
        };
        // The purchase is durable in Kafka now; if Redis misses this post
        // the shop-worker's own post will show the purchase shortly.
        if let Err(error) = gateway
            .board
            .post(&subject, PurchaseState::Queued, None, clock::now_ms())
            .await
        {
            tracing::warn!(%error, "could not post the queued status");
        }
        Ok(accepted(id, PurchaseState::Queued))
    }
    .instrument(span)
    .await
}

/// A POST repeated with the same Idempotency-Key: the same purchase, if it
/// asks for the same thing.
fn repeat(earlier: PurchaseStatus, sku: &Sku, quantity: Quantity) -> Result<Response, Problem> {
    if earlier.sku != sku.as_str() || earlier.quantity != quantity.get() {
        return Err(invalid(
            "idempotency-key-reused",
            format!(
                "this Idempotency-Key was used for {} x {}; a different purchase needs a new key",
                earlier.quantity, earlier.sku
            ),
        ));
    }
    let id = RequestId::parse(&earlier.request_id)
        .map_err(|e| invalid("invalid-request-id", e.to_string()))?;
    Ok(accepted(id, earlier.status))
}

fn accepted(id: RequestId, status: PurchaseState) -> Response {
    let status_url = format!("/v1/purchases/{id}");
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, status_url.clone())],
        Json(Accepted {
            request_id: id.to_string(),
            status,
            status_url,
        }),
    )
        .into_response()
}

#[derive(Deserialize)]
struct WaitQuery {
    wait: Option<f64>,
}

/// How often a long-poll looks at the board again.
const POLL_EVERY: Duration = Duration::from_millis(20);

async fn get_purchase(
    State(gateway): State<Shared>,
    Path(raw_id): Path<String>,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Json<PurchaseStatus>, Problem> {
    let id = RequestId::parse(&raw_id)
        .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "invalid-request-id", e.to_string()))?;
    let Query(query) =
        query.map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "invalid-query", e.body_text()))?;
    let wait = match query.wait {
        None => Duration::ZERO,
        Some(s) if s.is_finite() && s >= 0.0 => Duration::from_secs_f64(s).min(gateway.max_wait),
        Some(_) => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid-query",
                "wait must be a number of seconds, 0 or more",
            ));
        }
    };
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let status = match gateway
            .board
            .get(id)
            .await
            .map_err(|e| unavailable("the status store", e))?
        {
            Some(status) => Some(status),
            None => archived(&gateway, id).await?,
        };
        let done = status.as_ref().is_some_and(|s| s.status.is_terminal());
        if done || tokio::time::Instant::now() + POLL_EVERY > deadline {
            return status.map(Json).ok_or_else(|| {
                Problem::new(
                    StatusCode::NOT_FOUND,
                    "no-such-purchase",
                    format!("no purchase {id} is known (or it is older than the retention)"),
                )
            });
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// A purchase the status board no longer holds (older than the retention)
/// may still have its order in DynamoDB; a purchase rejected before it was
/// reserved has none, and is then unknown.
async fn archived(gateway: &Gateway, id: RequestId) -> Result<Option<PurchaseStatus>, Problem> {
    match gateway.orders.get(id).await {
        Ok(order) => Ok(order.map(|o| o.purchase_status())),
        Err(DynamoError::Request(e)) => Err(unavailable("the order store", e)),
        // No table yet, or the like: nothing archived to find.
        Err(error) => {
            tracing::debug!(%error, "order lookup refused");
            Ok(None)
        }
    }
}

#[derive(Serialize)]
struct Availability {
    sku: String,
    total: i64,
    available: i64,
    reserved: i64,
    sold: i64,
    sold_out: bool,
}

async fn get_sku(
    State(gateway): State<Shared>,
    Path(raw): Path<String>,
) -> Result<Json<Availability>, Problem> {
    let sku = Sku::parse(&raw)
        .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "invalid-sku", e.to_string()))?;
    let levels = gateway
        .stock
        .levels(&sku)
        .await
        .map_err(|e| unavailable("the stock store", e))?
        .ok_or_else(|| {
            Problem::new(
                StatusCode::NOT_FOUND,
                "unknown-sku",
                format!("there is no sale for sku {sku:?}"),
            )
        })?;
    Ok(Json(Availability {
        sku: sku.to_string(),
        total: levels.total,
        available: levels.available,
        reserved: levels.reserved,
        sold: levels.sold,
        sold_out: levels.sold_out,
    }))
}
