//! The buyer-facing HTTP API: `POST /v1/purchases`,
//! `GET /v1/purchases/{id}[?wait=S]`, `GET /v1/skus/{sku}`.
//!
//! Every refusal is a problem+json body that names what is wrong; nothing
//! is produced to Kafka unless the purchase is well-formed, for a sku that
//! exists and is not sold out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flashsale_core::bus::kafka;
use flashsale_core::bus::messages::{self, PurchaseRequest};
use flashsale_core::dynamo::DynamoError;
use flashsale_core::ids::{IdempotencyKey, Quantity, RequestId, Sku, UserId};
use flashsale_core::service::problem::Problem;
use flashsale_core::status::board::Subject;
use flashsale_core::status::{PurchaseState, PurchaseStatus};
use flashsale_core::stock::{Admission, ReserveOutcome};
use serde::{Deserialize, Serialize};
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use crate::Gateway;
use crate::auth;
use crate::limits::Denied;

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

/// The body of `POST /v1/purchases`. Public so that the benchmark's no-op
/// server parses exactly what the gateway parses.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurchaseBody {
    pub sku: String,
    /// The buyer; may be left out when the gateway verifies tokens (the
    /// token's subject is the buyer then).
    #[serde(default)]
    pub user_id: Option<String>,
    pub quantity: i64,
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

/// Who is buying: the token's subject when tokens are verified (a body
/// naming someone else is refused), else the body's `user_id`.
fn buyer(gateway: &Shared, headers: &HeaderMap, named: Option<&str>) -> Result<UserId, Problem> {
    match (&gateway.auth, named) {
        (Some(auth), named) => {
            let user = auth
                .buyer(headers)
                .map_err(|problem| gateway.shed("unauthenticated", problem))?;
            match named {
                Some(named) if named != user.as_str() => {
                    Err(gateway.shed("unauthenticated", auth::not_this_buyer(&user, named)))
                }
                _ => Ok(user),
            }
        }
        (None, Some(named)) => UserId::parse(named)
            .map_err(|e| gateway.shed("invalid", invalid("invalid-user-id", e.to_string()))),
        (None, None) => {
            Err(gateway.shed("invalid", invalid("invalid-user-id", "user_id is required")))
        }
    }
}

async fn create_purchase(
    State(gateway): State<Shared>,
    headers: HeaderMap,
    body: Result<Json<PurchaseBody>, JsonRejection>,
) -> Response {
    let limit = gateway.request_timeout;
    let deadline = tokio::time::Instant::now() + limit;
    // The produce's wait ends before `deadline` and voids what the broker
    // did not take; this is only a backstop for the store calls around it.
    let backstop = deadline + Duration::from_secs(1);
    match tokio::time::timeout_at(backstop, purchase(&gateway, &headers, body, deadline)).await {
        Ok(Ok(response)) => response,
        Ok(Err(problem)) => problem.into_response(),
        Err(_) => gateway
            .shed(
                "timeout",
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "timeout",
                    format!(
                        "the purchase was not queued within {} ms; retry with the same Idempotency-Key",
                        limit.as_millis()
                    ),
                )
                .retry_after(1),
            )
            .into_response(),
    }
}

/// The checks, cheapest first: the body; the line-full and closed flags in
/// memory (no network call, also for a repeated key unless it names a
/// purchase let in); the buyer's rate; for a repeated key, the status
/// board; this instance's rate and produces in flight; then the sku's
/// shared line in Redis; and only then Kafka.
async fn purchase(
    gateway: &Shared,
    headers: &HeaderMap,
    body: Result<Json<PurchaseBody>, JsonRejection>,
    deadline: tokio::time::Instant,
) -> Result<Response, Problem> {
    let Json(body) = body.map_err(|r| gateway.shed("invalid", body_problem(r)))?;
    let sku = Sku::parse(&body.sku)
        .map_err(|e| gateway.shed("invalid", invalid("invalid-sku", e.to_string())))?;
    let user = buyer(gateway, headers, body.user_id.as_deref())?;
    let quantity = Quantity::new(body.quantity)
        .map_err(|e| gateway.shed("invalid", invalid("invalid-quantity", e.to_string())))?;
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(raw) => Some(
            raw.to_str()
                .ok()
                .and_then(|raw| IdempotencyKey::parse(raw).ok())
                .ok_or_else(|| {
                    gateway.shed(
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
    // Before anything else is built for it (trace, span): in a crowd, this
    // is the answer almost every buyer gets. A repeated key may name a
    // purchase let in before the line filled up, whose state it must
    // answer; any other is refused from memory.
    let known = gateway.flags.get(&sku);
    if let Some(flags) = known
        && (key.is_none() || !gateway.flags.may_be_admitted(&sku, id))
    {
        if flags.over(gateway.now_ms()) {
            return Err(gateway.shed("not_active", not_active(&sku)));
        }
        if flags.line_full {
            return Err(gateway.shed("sold_out", sold_out(&sku)));
        }
    }
    let traceparent =
        kafka::continue_trace(headers.get("traceparent").and_then(|v| v.to_str().ok()), id);
    let span = tracing::info_span!("purchase", request_id = %id, %sku, %traceparent);
    async {
        gateway.users.check(user.as_str()).map_err(|denied| {
            gateway.shed(
                "user_rate",
                rate_limited(
                    StatusCode::TOO_MANY_REQUESTS,
                    "user-rate-limited",
                    format!(
                        "{user} sent more than {} purchases in a burst ({}/s on average)",
                        denied.limit, denied.per_second
                    ),
                    denied,
                ),
            )
        })?;
        if key.is_some()
            && let Some(earlier) = earlier_status(gateway, id).await?
        {
            return repeat(earlier, &sku, quantity);
        }
        gateway.global.check().map_err(|denied| {
            gateway.shed(
                "global_rate",
                rate_limited(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded",
                    "this gateway takes no more purchases per second right now",
                    denied,
                ),
            )
        })?;
        let permit = gateway.in_flight.clone().try_acquire_owned().map_err(|_| {
            gateway.shed(
                "in_flight",
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded",
                    "too many purchases wait for the broker's acknowledgement; retry shortly",
                )
                .retry_after(1),
            )
        })?;
        gateway
            .metrics
            .redis_calls
            .with_label_values(&["admit"])
            .inc();
        // Redis's clock, not this gateway's: every gateway shares the line.
        let admission = gateway
            .stock
            .admit(&sku, id, None, gateway.admission_lease_ms)
            .await
            .map_err(|e| gateway.shed("unavailable", unavailable("the stock store", e)))?;
        gateway
            .metrics
            .admissions
            .with_label_values(&[admission.label()])
            .inc();
        let (admitted, now) = match admission {
            Admission::Admitted { at_ms } => (true, at_ms),
            Admission::Duplicate {
                admitted_at_ms,
                now_ms: now,
            } => {
                if let Some(earlier) = earlier_status(gateway, id).await? {
                    return repeat(earlier, &sku, quantity);
                }
                if now.saturating_sub(admitted_at_ms) < gateway.abandoned_after_ms {
                    return Err(gateway.shed(
                        "in_progress",
                        Problem::new(
                            StatusCode::CONFLICT,
                            "request-in-progress",
                            "a request with this Idempotency-Key is being queued right now; \
                             retry in a second to read its result",
                        )
                        .retry_after(1),
                    ));
                }
                // Admitted long enough ago that its produce has ended, and
                // never acknowledged: the instance that admitted it died.
                // Queue it again; a shop-worker answers a request id once.
                (false, now)
            }
            Admission::Processed(outcome) => {
                if let Some(earlier) = earlier_status(gateway, id).await? {
                    return repeat(earlier, &sku, quantity);
                }
                return Ok(accepted(id, state_of(&outcome)));
            }
            Admission::Full { people, cap } => {
                return Err(gateway.shed(
                    "sold_out",
                    Problem::new(
                        StatusCode::CONFLICT,
                        "sold-out",
                        format!(
                            "{sku} is sold out: its units are sold or held for the {people} buyers \
                             ahead in its line (at most {cap} may be); \
                             units that come back go to them"
                        ),
                    ),
                ));
            }
            Admission::SoldOut => return Err(gateway.shed("sold_out", sold_out(&sku))),
            Admission::NotActive => return Err(gateway.shed("not_active", not_active(&sku))),
            Admission::Unknown => {
                return Err(unknown_to_redis(gateway, &sku, known.is_some()).await);
            }
            Admission::Reused => {
                return Err(gateway.shed(
                    "invalid",
                    invalid(
                        "idempotency-key-reused",
                        format!(
                            "this Idempotency-Key was used for a purchase of an earlier sale of \
                             {sku}; a new purchase needs a new key"
                        ),
                    ),
                ));
            }
        };
        let request = PurchaseRequest::new(id, sku.clone(), user.clone(), quantity, now);
        enqueue(
            gateway,
            request,
            traceparent.clone(),
            admitted,
            permit,
            deadline,
        )
        .await
    }
    .instrument(span)
    .await
}

/// A sku Redis holds no stock for: lost with Redis and not recovered yet
/// (a sale this gateway has seen, or one DynamoDB holds), so retry; or no
/// sale at all.
async fn unknown_to_redis(gateway: &Gateway, sku: &Sku, seen: bool) -> Problem {
    let sold = if seen {
        true
    } else {
        match gateway.inventory.get(sku).await {
            Ok(sale) => sale.is_some(),
            Err(DynamoError::Request(e)) => {
                return gateway.shed("unavailable", unavailable("the sale store", e));
            }
            Err(error) => {
                tracing::debug!(%error, "sale lookup refused");
                false
            }
        }
    };
    if !sold {
        return gateway.shed(
            "invalid",
            invalid("unknown-sku", format!("there is no sale for sku {sku:?}")),
        );
    }
    gateway.shed(
        "unavailable",
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "stock-unavailable",
            format!("the stock of {sku} is being restored; retry with the same Idempotency-Key"),
        )
        .retry_after(1),
    )
}

async fn earlier_status(
    gateway: &Gateway,
    id: RequestId,
) -> Result<Option<PurchaseStatus>, Problem> {
    gateway
        .metrics
        .redis_calls
        .with_label_values(&["status"])
        .inc();
    gateway
        .board
        .get(id)
        .await
        .map_err(|e| gateway.shed("unavailable", unavailable("the status store", e)))
}

/// The state a buyer is told for a shop-worker's answer.
fn state_of(outcome: &ReserveOutcome) -> PurchaseState {
    match outcome {
        ReserveOutcome::Reserved { .. } => PurchaseState::Reserved,
        ReserveOutcome::Rejected { .. } | ReserveOutcome::Voided => PurchaseState::Rejected,
        ReserveOutcome::Waiting => PurchaseState::Waiting,
    }
}

/// What is left of the request's time for the void (one Redis call) once
/// the broker has not answered.
const VOID_BUDGET: Duration = Duration::from_millis(250);

/// Produces the purchase and waits for the broker, until shortly before
/// `deadline`. The produce runs as a task of its own, to its end, even if
/// the buyer hangs up: the record may be on its way, and the status board
/// (acknowledged) or the admission window (failed) must learn how it
/// ended. A purchase the broker did not acknowledge in time, or refused,
/// is voided before its buyer is told it failed (`void.lua`): if Kafka
/// has it after all, no shop-worker processes it; if a shop-worker
/// already did, the buyer is told that instead of a failure.
async fn enqueue(
    gateway: &Shared,
    request: PurchaseRequest,
    traceparent: String,
    admitted: bool,
    permit: OwnedSemaphorePermit,
    deadline: tokio::time::Instant,
) -> Result<Response, Problem> {
    let id = request.request_id;
    let sku = request.sku.clone();
    // Whether its buyer was told it failed; held while `queued` is posted,
    // so that no such post lands after the purchase was voided.
    let voided = Arc::new(tokio::sync::Mutex::new(false));
    let task = {
        let (gateway, voided) = (gateway.clone(), voided.clone());
        async move {
            let _permit = permit;
            let started = Instant::now();
            gateway.metrics.in_flight.inc();
            let sent = gateway
                .producer
                .send(
                    &gateway.purchase_topic,
                    request.sku.as_str(),
                    &messages::encode(&request),
                    kafka::headers_with_trace(&traceparent),
                    gateway.produce_timeout,
                )
                .await;
            gateway.metrics.in_flight.dec();
            gateway
                .metrics
                .produce_seconds
                .observe(started.elapsed().as_secs_f64());
            match sent {
                Ok(record) => {
                    let subject = Subject {
                        id,
                        sku: &request.sku,
                        user: &request.user_id,
                        quantity: request.quantity,
                    };
                    let voided = voided.lock().await;
                    // Durable in Kafka now; if Redis misses this post the
                    // shop-worker's own post shows the purchase shortly.
                    if !*voided
                        && let Err(error) = gateway
                            .board
                            .post_queued(&subject, record, gateway.now_ms())
                            .await
                    {
                        tracing::warn!(%error, "could not post the queued status");
                    }
                    Ok(())
                }
                Err(error) => {
                    if admitted && let Err(error) = gateway.stock.unadmit(&request.sku, id).await {
                        // The lease frees the place later.
                        tracing::warn!(%error, "could not give back the admission");
                    }
                    Err(error.to_string())
                }
            }
        }
        .instrument(tracing::Span::current())
    };
    let waited = tokio::time::timeout_at(deadline - VOID_BUDGET, tokio::spawn(task)).await;
    let why = match waited {
        Ok(Ok(Ok(()))) => return Ok(accepted(id, PurchaseState::Queued)),
        Ok(Ok(Err(error))) => error,
        Ok(Err(error)) => error.to_string(),
        Err(_) => "the broker did not acknowledge it in time".to_owned(),
    };
    *voided.lock().await = true;
    match gateway.stock.void(&sku, id, gateway.now_ms()).await {
        Ok(None) => {
            if let Err(error) = gateway.board.forget(id).await {
                tracing::warn!(%error, "could not take back the queued status");
            }
            Err(gateway.shed(
                "broker",
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "temporarily-unavailable",
                    format!(
                        "the purchase queue did not take the purchase ({why}); it will not be \
                         processed: retry (with the same Idempotency-Key)"
                    ),
                )
                .retry_after(1),
            ))
        }
        // It went through after all, and a shop-worker answered it.
        Ok(Some(outcome)) => Ok(accepted(id, state_of(&outcome))),
        Err(error) => {
            tracing::error!(%error, "could not void a purchase the broker did not take; it may still be processed");
            Err(gateway.shed("broker", unavailable("the purchase queue", why)))
        }
    }
}

fn sold_out(sku: &Sku) -> Problem {
    Problem::new(
        StatusCode::CONFLICT,
        "sold-out",
        format!(
            "{sku} is sold out: its units are sold or held for buyers ahead in its line, \
             who get any unit that comes back"
        ),
    )
}

/// Closed or over: final. (Before the opening a buyer takes a place in the
/// line instead.)
fn not_active(sku: &Sku) -> Problem {
    Problem::new(
        StatusCode::CONFLICT,
        "sale-not-active",
        format!("the sale of {sku} is closed or over"),
    )
}

/// A refusal by a rate limit, with `Retry-After` and the `RateLimit-*`
/// headers of the IETF draft (limit, remaining, seconds to reset).
fn rate_limited(
    status: StatusCode,
    kind: &str,
    detail: impl Into<String>,
    denied: Denied,
) -> Problem {
    let wait = denied.retry_after_secs();
    Problem::new(status, kind, detail)
        .retry_after(wait)
        .header("ratelimit-limit", denied.limit)
        .header("ratelimit-remaining", 0)
        .header("ratelimit-reset", wait)
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
            .map_err(|e| unavailable("the status store", e))?
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
            if let Err(problem) =
                enqueue(gateway, request, traceparent, true, permit, deadline).await
            {
                tracing::warn!(request_id = %id, ?problem, "could not queue a lost purchase again");
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
        .map_err(|e| unavailable("the stock store", e))?
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
