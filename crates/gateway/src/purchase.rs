//! `POST /v1/purchases`: the I/O around the admission decision. It reads
//! the request, finds out what `decision::next` asks for, in the order it
//! asks, and carries out what it decides: answer, refuse, or produce to
//! Kafka and wait for the broker. It decides nothing itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use flashsale_core::bus::kafka;
use flashsale_core::bus::messages::{self, PurchaseRequest};
use flashsale_core::dynamo::DynamoError;
use flashsale_core::ids::RequestId;
use flashsale_core::service::problem::Problem;
use flashsale_core::status::board::Subject;
use flashsale_core::status::{PurchaseState, PurchaseStatus};
use serde::Serialize;
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use crate::Gateway;
use crate::decision::{self, Facts, Purchase, PurchaseBody, Question, Rules, Step};
use crate::refusal::Refusal;

#[derive(Serialize)]
struct Accepted {
    request_id: String,
    status: PurchaseState,
    status_url: String,
}

pub(crate) async fn create_purchase(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Result<Json<PurchaseBody>, JsonRejection>,
) -> Response {
    let deadline = tokio::time::Instant::now() + gateway.request_timeout;
    match purchase(&gateway, &headers, body, deadline).await {
        Ok(response) => response,
        Err(refusal) => refuse(&gateway, refusal).into_response(),
    }
}

/// Counted as shed, under the refusal's label; a store's error is logged
/// here (the buyer is told only which store).
fn refuse(gateway: &Gateway, refusal: Refusal) -> Problem {
    if let Refusal::Unavailable { what, error } = &refusal {
        tracing::warn!(%error, "{what} unavailable");
    }
    gateway.shed(refusal.label(), refusal.problem())
}

async fn purchase(
    gateway: &Arc<Gateway>,
    headers: &HeaderMap,
    body: Result<Json<PurchaseBody>, JsonRejection>,
    deadline: tokio::time::Instant,
) -> Result<Response, Refusal> {
    let body = body.map(|Json(body)| body).map_err(Refusal::body);
    let purchase = decision::read(body, headers, gateway.auth.as_ref(), RequestId::fresh)?;
    if let Some(recorder) = &gateway.recorder {
        recorder.arrived(&purchase);
    }
    let rules = Rules {
        abandoned_after_ms: gateway.abandoned_after_ms,
    };
    let flags = gateway.flags.get(&purchase.sku);
    let mut facts = Facts {
        now_ms: gateway.now_ms(),
        // Asked only where the decision reads it (a keyed purchase of a
        // sku with flags), as before the split: it takes the copy's lock.
        may_be_admitted: purchase.keyed
            && flags.is_some()
            && gateway.flags.may_be_admitted(&purchase.sku, purchase.id),
        flags,
        ..Facts::default()
    };
    // Decided once before anything else is built for it (trace, span): in
    // a crowd, a refusal from memory is the answer almost every buyer gets.
    let mut step = decision::next(&purchase, &facts, &rules);
    if let Step::Refuse(refusal) = step {
        return Err(refusal);
    }
    let traceparent = kafka::continue_trace(
        headers.get("traceparent").and_then(|v| v.to_str().ok()),
        purchase.id,
    );
    let span = tracing::info_span!("purchase", request_id = %purchase.id, sku = %purchase.sku, %traceparent);
    async {
        let mut slot = None;
        loop {
            match step {
                // The store calls before the produce are cut at a backstop
                // past the deadline. The produce and what follows it are
                // not: once a record may be on its way, the handler must
                // finish what tells its fate (the status posted, or the
                // purchase voided and its status taken back) and answer
                // with it. Cut there, a buyer was told 503 while the record
                // went on (charged, yet refused "sold out" on the retry),
                // or a voided purchase kept a `queued` status for good
                // (chaos campaign, seed 7, round 43: Redis 355 ms away).
                // Each call after the produce is bounded by the connection
                // (`redis_conn`), so the answer still comes.
                Step::Ask(question) => {
                    let backstop = deadline + BACKSTOP;
                    let found = find_out(gateway, &purchase, question, &mut facts, &mut slot);
                    tokio::time::timeout_at(backstop, found)
                        .await
                        .map_err(|_| Refusal::Timeout {
                            limit: gateway.request_timeout,
                        })??;
                }
                Step::Refuse(refusal) => return Err(refusal),
                Step::Answer(state) => return Ok(accepted(purchase.id, state)),
                Step::Enqueue { admitted, at_ms } => {
                    // The decision enqueues only with a slot found free.
                    let slot = slot.take().ok_or(Refusal::InFlightFull)?;
                    let Purchase {
                        id,
                        sku,
                        user,
                        quantity,
                        ..
                    } = purchase;
                    let request = PurchaseRequest::new(id, sku, user, quantity, at_ms);
                    return enqueue(gateway, request, traceparent, admitted, slot, deadline).await;
                }
            }
            step = decision::next(&purchase, &facts, &rules);
        }
    }
    .instrument(span)
    .await
}

/// Finds out what the decision asked, and writes it into `facts`. A
/// produce slot taken is kept in `slot` until the produce ends.
async fn find_out(
    gateway: &Gateway,
    purchase: &Purchase,
    question: Question,
    facts: &mut Facts,
    slot: &mut Option<OwnedSemaphorePermit>,
) -> Result<(), Refusal> {
    match question {
        Question::UserRate => facts.user_rate = Some(gateway.users.check(&purchase.user)),
        Question::Earlier => facts.earlier = Some(earlier_status(gateway, purchase.id).await?),
        Question::GlobalRate => facts.global_rate = Some(gateway.global.check()),
        Question::ProduceSlot => {
            *slot = gateway.in_flight.clone().try_acquire_owned().ok();
            facts.produce_slot = Some(slot.is_some());
        }
        Question::Admission => {
            gateway
                .metrics
                .redis_calls
                .with_label_values(&["admit"])
                .inc();
            let admission = gateway
                .stock
                .admit(&purchase.sku, purchase.id, None, gateway.admission_lease_ms)
                .await
                .map_err(|e| Refusal::unavailable("the stock store", e))?;
            gateway
                .metrics
                .admissions
                .with_label_values(&[admission.label()])
                .inc();
            if let flashsale_core::stock::Admission::Admitted { .. }
            | flashsale_core::stock::Admission::Duplicate { .. } = admission
            {
                gateway.flags.note_admitted(&purchase.sku, purchase.id);
            }
            facts.admission = Some(admission);
        }
        Question::EarlierSinceAdmission => {
            facts.earlier_since_admission = Some(earlier_status(gateway, purchase.id).await?);
        }
        Question::SaleExists => {
            facts.sale_exists = Some(match gateway.inventory.get(&purchase.sku).await {
                Ok(sale) => sale.is_some(),
                Err(DynamoError::Request(e)) => {
                    return Err(Refusal::unavailable("the sale store", e));
                }
                Err(error) => {
                    tracing::debug!(%error, "sale lookup refused");
                    false
                }
            });
        }
    }
    Ok(())
}

async fn earlier_status(
    gateway: &Gateway,
    id: RequestId,
) -> Result<Option<PurchaseStatus>, Refusal> {
    gateway
        .metrics
        .redis_calls
        .with_label_values(&["status"])
        .inc();
    gateway
        .board
        .get(id)
        .await
        .map_err(|e| Refusal::unavailable("the status store", e))
}

const VOID_BUDGET: Duration = Duration::from_millis(250);

/// How long past its deadline a purchase may still wait on the store calls
/// before its produce.
const BACKSTOP: Duration = Duration::from_secs(1);

/// Produces the purchase and waits for the broker, until shortly before
/// `deadline`. The produce runs as a task of its own, to its end, even if
/// the buyer hangs up: the record may be on its way, and the status board
/// (acknowledged) or the admission window (failed) must learn how it
/// ended. A purchase the broker did not acknowledge in time, or refused,
/// is voided before its buyer is told it failed (`void.lua`): if Kafka
/// has it after all, no shop-worker processes it; if a shop-worker
/// already did, the buyer is told that instead of a failure.
pub(crate) async fn enqueue(
    gateway: &Arc<Gateway>,
    request: PurchaseRequest,
    traceparent: String,
    admitted: bool,
    permit: OwnedSemaphorePermit,
    deadline: tokio::time::Instant,
) -> Result<Response, Refusal> {
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
    let void = gateway.stock.void(&sku, id, gateway.now_ms()).await;
    match &void {
        Ok(None) => {
            if let Err(error) = gateway.board.forget(id).await {
                tracing::warn!(%error, "could not take back the queued status");
            }
        }
        Ok(Some(_)) => {}
        Err(error) => {
            tracing::error!(%error, "could not void a purchase the broker did not take; it may still be processed");
        }
    }
    decision::after_failed_produce(why, void).map(|state| accepted(id, state))
}

pub(crate) fn accepted(id: RequestId, status: PurchaseState) -> Response {
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
