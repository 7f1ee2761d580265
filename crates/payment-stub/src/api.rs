//! The processor's API: charges (idempotent by the `Idempotency-Key`
//! header, a reused key with another body refused), lookups by key, and
//! refunds (once per charge).

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State, rejection::JsonRejection};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use flashsale_core::clock;
use flashsale_core::payment::{
    Charge, ChargeRequest, ChargeStatus, IDEMPOTENCY_KEY, Refund, RefundRequest,
};
use flashsale_core::service::problem::Problem;
use serde::Deserialize;

use crate::Stub;
use crate::faults::declines;
use crate::ledger::{Entry, ledger_down};

pub(crate) fn bad_json(rejection: JsonRejection) -> Problem {
    Problem::new(
        StatusCode::BAD_REQUEST,
        "invalid-body",
        rejection.body_text(),
    )
}

pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<String, Problem> {
    headers
        .get(IDEMPOTENCY_KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 255)
        .map(str::to_owned)
        .ok_or_else(|| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "missing-idempotency-key",
                "every charge needs an Idempotency-Key header (1 to 255 characters)",
            )
        })
}

pub(crate) async fn create_charge(
    State(stub): State<Stub>,
    headers: HeaderMap,
    body: Result<Json<ChargeRequest>, JsonRejection>,
) -> Result<Response, Problem> {
    let key = idempotency_key(&headers)?;
    let Json(request) = body.map_err(bad_json)?;
    if request.amount_cents == 0 {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-amount",
            "amount_cents must be positive",
        ));
    }
    let behaviour = stub.behaviour();
    // Recorded in a task of its own: a client that hangs up mid-write must
    // not leave a charge on disk that memory does not know.
    let (charge, replayed) = tokio::spawn(record_charge(
        stub.clone(),
        key,
        request,
        behaviour.decline_rate,
    ))
    .await
    .map_err(|e| ledger_down(e.to_string()))??;
    let outcome = match (charge.status, replayed) {
        (_, true) => "replayed",
        (ChargeStatus::Succeeded, false) => "succeeded",
        (ChargeStatus::Declined, false) => "declined",
    };
    stub.charges_total.with_label_values(&[outcome]).inc();
    if stub.draw("timeout") < behaviour.timeout_rate {
        // Made and recorded, but the answer comes after the client gave up.
        stub.charges_total.with_label_values(&["hung"]).inc();
        tokio::time::sleep(Duration::from_millis(behaviour.hang_ms)).await;
    }
    let status = match charge.status {
        ChargeStatus::Succeeded => StatusCode::CREATED,
        ChargeStatus::Declined => StatusCode::PAYMENT_REQUIRED,
    };
    Ok((status, Json(charge)).into_response())
}

/// Looks the key up, or makes and records the charge: `(charge, replayed)`.
pub(crate) async fn record_charge(
    stub: Stub,
    key: String,
    request: ChargeRequest,
    decline_rate: f64,
) -> Result<(Charge, bool), Problem> {
    let mut ledger = stub.ledger.lock().await;
    let answer = match ledger.charges.get(&key) {
        Some((first, charge)) if *first == request => (charge.clone(), true),
        Some(_) => {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency-key-reused",
                format!("Idempotency-Key {key:?} was already used for a different charge"),
            ));
        }
        None => {
            let id = format!("ch_{:08}", ledger.next);
            let charge = Charge {
                id: id.clone(),
                idempotency_key: key.clone(),
                amount_cents: request.amount_cents,
                currency: request.currency.clone(),
                status: if declines(&key, decline_rate) {
                    ChargeStatus::Declined
                } else {
                    ChargeStatus::Succeeded
                },
                refunded: false,
                metadata: request.metadata.clone(),
                created_at_ms: clock::now_ms(),
            };
            let entry = Entry::Charge {
                request,
                charge: charge.clone(),
            };
            ledger.persist(&entry).await?;
            ledger.apply(entry);
            (charge, false)
        }
    };
    Ok(answer)
}

#[derive(Deserialize)]
pub(crate) struct ChargeFilter {
    sale_id: Option<String>,
    idempotency_key: Option<String>,
}

pub(crate) async fn list_charges(
    State(stub): State<Stub>,
    Query(filter): Query<ChargeFilter>,
) -> Result<Json<Vec<Charge>>, Problem> {
    let ledger = stub.ledger.lock().await;
    let mut charges: Vec<Charge> = ledger
        .charges
        .values()
        .map(|(_, charge)| charge)
        .filter(|c| {
            filter
                .sale_id
                .as_ref()
                .is_none_or(|s| &c.metadata.sale_id == s)
        })
        .filter(|c| {
            filter
                .idempotency_key
                .as_ref()
                .is_none_or(|k| &c.idempotency_key == k)
        })
        .cloned()
        .collect();
    charges.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(Json(charges))
}

pub(crate) async fn get_charge(
    State(stub): State<Stub>,
    Path(id): Path<String>,
) -> Result<Json<Charge>, Problem> {
    let ledger = stub.ledger.lock().await;
    ledger
        .key_of_charge
        .get(&id)
        .and_then(|key| ledger.charges.get(key))
        .map(|(_, charge)| Json(charge.clone()))
        .ok_or_else(|| {
            Problem::new(
                StatusCode::NOT_FOUND,
                "no-such-charge",
                format!("no charge {id}"),
            )
        })
}

pub(crate) async fn create_refund(
    State(stub): State<Stub>,
    body: Result<Json<RefundRequest>, JsonRejection>,
) -> Result<Json<Refund>, Problem> {
    let Json(request) = body.map_err(bad_json)?;
    // In a task of its own, for the same reason as a charge.
    tokio::spawn(record_refund(stub, request.charge_id))
        .await
        .map_err(|e| ledger_down(e.to_string()))?
        .map(Json)
}

/// Refunds a charge once; a repeat answers the first refund.
pub(crate) async fn record_refund(stub: Stub, charge_id: String) -> Result<Refund, Problem> {
    let mut ledger = stub.ledger.lock().await;
    if let Some(refund) = ledger.refunds.get(&charge_id) {
        return Ok(refund.clone());
    }
    let charge = ledger
        .key_of_charge
        .get(&charge_id)
        .and_then(|key| ledger.charges.get(key))
        .map(|(_, charge)| charge.clone())
        .ok_or_else(|| {
            Problem::new(
                StatusCode::NOT_FOUND,
                "no-such-charge",
                format!("no charge {}", charge_id),
            )
        })?;
    if charge.status != ChargeStatus::Succeeded {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not-refundable",
            format!(
                "charge {} was declined: there is nothing to refund",
                charge.id
            ),
        ));
    }
    let refund = Refund {
        id: format!("re_{}", charge.id.trim_start_matches("ch_")),
        charge_id: charge.id.clone(),
        amount_cents: charge.amount_cents,
    };
    let entry = Entry::Refund {
        refund: refund.clone(),
    };
    ledger.persist(&entry).await?;
    ledger.apply(entry);
    Ok(refund)
}
