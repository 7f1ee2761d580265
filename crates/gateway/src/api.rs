//! The buyer-facing HTTP API: its routes, and the reads
//! (`GET /v1/purchases/{id}[?wait=S]`, `GET /v1/skus/{sku}`). The purchase
//! itself is `purchase.rs` (its I/O) and `decision.rs` (its decision).
//!
//! Every refusal is a problem+json body that names what is wrong; nothing
//! is produced to Kafka unless the purchase is well-formed, for a sku that
//! exists and is not sold out.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use flashsale_core::bus::kafka;
use flashsale_core::bus::messages::PurchaseRequest;
use flashsale_core::dynamo::DynamoError;
use flashsale_core::ids::{Quantity, RequestId, Sku, UserId};
use flashsale_core::service::layers;
use flashsale_core::service::problem::Problem;
use flashsale_core::status::board::Subject;
use flashsale_core::status::{PurchaseState, PurchaseStatus};
use flashsale_core::stock::Admission;
use serde::{Deserialize, Serialize};
use tower::ServiceBuilder;

use crate::Gateway;
use crate::purchase::{create_purchase, enqueue};
use crate::refusal;

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
        // One layer call: each boxes every route once more (see
        // `service::layers`). Panics are caught inside the counter, so
        // that their answers are counted too; axum's body limit, not
        // tower-http's, for a problem answer.
        .layer(
            ServiceBuilder::new()
                .layer(middleware::from_fn_with_state(
                    gateway.clone(),
                    count_responses,
                ))
                .layer(layers::catch_panics())
                .layer(DefaultBodyLimit::max(max_body_bytes)),
        )
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
struct WaitQuery {
    wait: Option<f64>,
}

/// The longest a status answer waits for the shop-workers' progress.
const QUEUE_POSITION_WAIT: Duration = Duration::from_millis(250);

async fn get_purchase(
    State(gateway): State<Shared>,
    headers: HeaderMap,
    raw_id: Result<Path<String>, PathRejection>,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Json<PurchaseStatus>, Problem> {
    // With tokens verified, a buyer reads only their own purchases (keyed
    // request ids can be derived by anyone who knows buyer and key).
    let reader = match &gateway.auth {
        Some(auth) => Some(auth.buyer(&headers)?),
        None => None,
    };
    let id = RequestId::parse(&path_segment(raw_id, "invalid-request-id")?)
        .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "invalid-request-id", e.to_string()))?;
    let Query(query) =
        query.map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "invalid-query", e.body_text()))?;
    let wait = match query.wait {
        None => Duration::ZERO,
        // Capped before it becomes a Duration, which 1e20 s would overflow.
        Some(s) if s.is_finite() && s >= 0.0 => {
            Duration::from_secs_f64(s.min(gateway.max_wait.as_secs_f64()))
        }
        Some(_) => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid-query",
                "wait must be a number of seconds, 0 or more",
            ));
        }
    };
    let deadline = tokio::time::Instant::now() + wait;
    // Registered before the first read, so that no change is missed; a
    // long-poll then reads the board when it starts, when a change to its
    // purchase is published, and when its wait is over: never on a timer.
    let waiter = if wait.is_zero() {
        None
    } else {
        Some(gateway.waiters.wait_on(id).ok_or_else(|| {
            gateway.shed(
                "long_polls",
                Problem::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too-many-long-polls",
                    "this gateway has as many long-polls waiting as it allows; \
                     ask again shortly, or without ?wait",
                )
                .retry_after(1),
            )
        })?)
    };
    loop {
        let woken = waiter.as_ref().map(|w| w.notify().notified());
        tokio::pin!(woken);
        if let Some(woken) = woken.as_mut().as_pin_mut() {
            woken.enable();
        }
        let status = match gateway
            .board
            .get(id)
            .await
            .map_err(|e| store_unavailable("the status store", e))?
        {
            Some(status) => Some(status),
            None => archived(&gateway, id).await?,
        };
        // Someone else's purchase is answered as one never made.
        let status = status.filter(|s| reader.as_ref().is_none_or(|r| r.as_str() == s.user_id));
        let done = status.as_ref().is_some_and(|s| s.status.is_terminal());
        if done || waiter.is_none() || tokio::time::Instant::now() >= deadline {
            let mut status = status;
            if let Some(s) = status.as_mut() {
                place(&gateway, id, s).await;
            }
            return status.map(Json).ok_or_else(|| {
                Problem::new(
                    StatusCode::NOT_FOUND,
                    "no-such-purchase",
                    format!("no purchase {id} is known (or it is older than the retention)"),
                )
            });
        }
        tokio::select! {
            _ = async {
                if let Some(woken) = woken.as_mut().as_pin_mut() {
                    woken.await;
                }
            } => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// `503` for a store a read cannot ask; the error is logged, not told.
fn store_unavailable(what: &str, error: impl std::fmt::Display) -> Problem {
    tracing::warn!(%error, "{what} unavailable");
    refusal::unavailable(what)
}

/// Where a purchase not yet decided stands: for `queued`, how far its
/// record is from the shop-workers; for `waiting`, its place in the sku's
/// line, which asking keeps (a buyer who stops asking loses it).
async fn place(gateway: &Shared, id: RequestId, status: &mut PurchaseStatus) {
    match status.status {
        PurchaseState::Queued => {
            let Some((partition, offset)) = status.record else {
                return;
            };
            // A position is a nicety: an unreachable broker must not
            // hold up the answer.
            status.queue_position = tokio::time::timeout(
                QUEUE_POSITION_WAIT,
                gateway.queue.position(partition, offset),
            )
            .await
            .ok()
            .flatten();
        }
        PurchaseState::Waiting => {
            let Ok(sku) = Sku::parse(&status.sku) else {
                return;
            };
            let now = gateway.now_ms();
            match gateway.stock.line_place(&sku, id, now).await {
                Ok(Some(place)) => {
                    status.queue_position = Some(place.position);
                    status.units_may_return = Some(place.units_may_return);
                    status.wait_at_most_s = place
                        .decided_by_ms
                        .map(|by| by.saturating_sub(now).div_ceil(1000));
                }
                Ok(None) => rejoin(gateway, id, status).await,
                Err(error) => tracing::warn!(%error, "reading a place in line failed"),
            }
        }
        _ => {}
    }
}

/// A purchase the board shows `waiting` that its sku's line no longer
/// holds. Either a script just decided it (its answer is remembered, and
/// being announced), or the line was lost with the Redis that held it
/// while the board kept, or was later given, the `waiting` post: a Redis
/// replaced between a shop-worker's join and its post, or the line's node
/// of a cluster lost. The admission script tells the two apart; a lost
/// purchase is queued again, at the back of the line (the line it stood
/// in is gone), or turned away if there is no room left in it.
async fn rejoin(gateway: &Shared, id: RequestId, status: &PurchaseStatus) {
    let (Ok(sku), Ok(user), Ok(quantity)) = (
        Sku::parse(&status.sku),
        UserId::parse(&status.user_id),
        Quantity::new(status.quantity.into()),
    ) else {
        return;
    };
    // Taken before admitting, so that a purchase let in is also produced.
    let Ok(permit) = gateway.in_flight.clone().try_acquire_owned() else {
        return;
    };
    gateway
        .metrics
        .redis_calls
        .with_label_values(&["admit"])
        .inc();
    let reason = match gateway
        .stock
        .admit(&sku, id, None, gateway.admission_lease_ms)
        .await
    {
        Ok(Admission::Admitted { at_ms }) => {
            tracing::warn!(request_id = %id, %sku, "a waiting purchase was lost with its line; queued again");
            let request = PurchaseRequest::new(id, sku.clone(), user.clone(), quantity, at_ms);
            let traceparent = kafka::continue_trace(None, id);
            let deadline = tokio::time::Instant::now() + gateway.request_timeout;
            if let Err(refusal) =
                enqueue(gateway, request, traceparent, true, permit, deadline).await
            {
                tracing::warn!(request_id = %id, ?refusal, "could not queue a lost purchase again");
            }
            return;
        }
        Ok(Admission::Full { .. } | Admission::SoldOut) => "sold_out",
        Ok(Admission::NotActive) => "sale_not_active",
        // In the line, decided, on its way, or the sku not restored yet.
        Ok(_) => return,
        Err(error) => {
            tracing::warn!(%error, "checking a waiting purchase failed");
            return;
        }
    };
    tracing::warn!(request_id = %id, %sku, reason, "a waiting purchase was lost with its line; no room left for it");
    let subject = Subject {
        id,
        sku: &sku,
        user: &user,
        quantity,
    };
    if let Err(error) = gateway
        .board
        .post(
            &subject,
            PurchaseState::Rejected,
            Some(reason),
            gateway.now_ms(),
        )
        .await
    {
        tracing::warn!(%error, "could not post the rejection of a lost purchase");
    }
}

/// A purchase the status board no longer holds (older than the retention)
/// may still have its order in DynamoDB; a purchase rejected before it was
/// reserved has none, and is then unknown.
async fn archived(gateway: &Gateway, id: RequestId) -> Result<Option<PurchaseStatus>, Problem> {
    match gateway.orders.get(id).await {
        Ok(order) => Ok(order.map(|o| o.purchase_status())),
        Err(DynamoError::Request(e)) => Err(store_unavailable("the order store", e)),
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
    closed: bool,
    /// Purchases let into the line that no shop-worker has seen yet.
    queued: i64,
    /// Buyers in the line, waiting for a unit to come back.
    waiting: i64,
    /// Buyers holding a reservation (not yet paid or given back).
    holders: i64,
    /// How many buyers may hold, wait or be on their way at once:
    /// ceil(overbook x units not sold yet).
    line_cap: i64,
    /// No room in the line: purchases are answered `sold-out`.
    line_full: bool,
    overbook: f64,
    /// The flags this gateway answers purchases with (its in-memory copy);
    /// `null` if it has not heard of the sku.
    gateway: Option<GatewayView>,
}

#[derive(Serialize)]
struct GatewayView {
    sold_out: bool,
    closed: bool,
    line_full: bool,
}

/// A path's one parameter, or a problem of `kind` saying why it is not one
/// (say, percent-encoded bytes that are not UTF-8).
fn path_segment(raw: Result<Path<String>, PathRejection>, kind: &str) -> Result<String, Problem> {
    raw.map(|Path(raw)| raw)
        .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, kind, e.body_text()))
}

async fn get_sku(
    State(gateway): State<Shared>,
    raw: Result<Path<String>, PathRejection>,
) -> Result<Json<Availability>, Problem> {
    let sku = Sku::parse(&path_segment(raw, "invalid-sku")?)
        .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "invalid-sku", e.to_string()))?;
    let status = gateway
        .stock
        .status(&sku, gateway.now_ms())
        .await
        .map_err(|e| store_unavailable("the stock store", e))?
        .ok_or_else(|| {
            Problem::new(
                StatusCode::NOT_FOUND,
                "unknown-sku",
                format!("there is no sale for sku {sku:?}"),
            )
        })?;
    let levels = &status.levels;
    Ok(Json(Availability {
        sku: sku.to_string(),
        total: levels.total,
        available: levels.available,
        reserved: levels.reserved,
        sold: levels.sold,
        sold_out: levels.sold_out,
        closed: status.closed,
        queued: status.queued,
        waiting: status.waiting,
        holders: status.holders,
        line_cap: status.line_cap,
        line_full: status.line_full,
        overbook: status.overbook,
        gateway: gateway.flags.get(&sku).map(|f| GatewayView {
            sold_out: f.sold_out,
            closed: f.closed,
            line_full: f.line_full,
        }),
    }))
}
