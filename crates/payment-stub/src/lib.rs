//! payment-stub: a payment service that behaves like a card processor.
//!
//! Charges are idempotent by the `Idempotency-Key` header: the same key and
//! body give back the first charge, the same key with another body is
//! refused. Whether a charge is declined is decided by the key itself, so a
//! retry after a timeout can never turn a decline into a success. Latency
//! and decline rate are set by environment and changed at run time through
//! `PUT /admin/behaviour`, which is how a surge asks for its decline rate.
//!
//! State lives in memory: a restart forgets every charge (see README).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State, rejection::JsonRejection};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flashsale_core::payment::{
    Charge, ChargeRequest, ChargeStatus, IDEMPOTENCY_KEY, Refund, RefundRequest, StubBehaviour,
};
use flashsale_core::problem::Problem;
use flashsale_core::settings::{Env, SettingError};
use flashsale_core::{clock, ops};
use prometheus::{IntCounterVec, Opts, Registry};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// Settings of the payment stub.
#[derive(Debug, Clone)]
pub struct Config {
    /// `FLASHSALE_PAYMENT_ADDR`: where it listens.
    pub addr: SocketAddr,
    /// `FLASHSALE_PAYMENT_DECLINE_RATE` and `FLASHSALE_PAYMENT_LATENCY_MS`.
    pub behaviour: StubBehaviour,
}

impl Config {
    pub fn from_env(env: &Env) -> Result<Self, SettingError> {
        Ok(Self {
            addr: env.get("PAYMENT_ADDR", SocketAddr::from(([127, 0, 0, 1], 18081)))?,
            behaviour: StubBehaviour {
                decline_rate: env.fraction("PAYMENT_DECLINE_RATE", 0.0)?,
                latency_ms: env.get("PAYMENT_LATENCY_MS", 20)?,
            },
        })
    }
}

struct Ledger {
    /// By idempotency key: the request as first sent, and its charge.
    charges: HashMap<String, (ChargeRequest, Charge)>,
    key_of_charge: HashMap<String, String>,
    refunds: HashMap<String, Refund>,
    next: u64,
}

#[derive(Clone)]
struct Stub {
    ledger: Arc<Mutex<Ledger>>,
    behaviour: Arc<Mutex<StubBehaviour>>,
    charges_total: IntCounterVec,
}

impl Stub {
    /// The ledger; a panic while it was held (a bug) makes the stub answer
    /// 503, as a processor with a broken database would.
    fn ledger(&self) -> Result<std::sync::MutexGuard<'_, Ledger>, Problem> {
        self.ledger.lock().map_err(|_| {
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the payment ledger is unavailable",
            )
        })
    }
}

/// FNV-1a followed by MurmurHash3's 64-bit finalizer: stable across runs
/// and platforms (unlike `DefaultHasher`), and well spread even for short
/// keys that differ in one character, which FNV alone is not.
fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    });
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Whether the charge under `key` is declined at `rate`: the same key gets
/// the same answer for as long as the rate is unchanged.
pub fn declines(key: &str, rate: f64) -> bool {
    (stable_hash(key.as_bytes()) as f64 / u64::MAX as f64) < rate
}

pub struct PaymentStub {
    pub local_addr: SocketAddr,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Binds `config.addr` (port 0 picks a free one) and serves until `shutdown`.
pub async fn start(config: Config, shutdown: CancellationToken) -> std::io::Result<PaymentStub> {
    let registry = Registry::new();
    let charges_total = IntCounterVec::new(
        Opts::new("payment_charges_total", "Charge requests by outcome"),
        &["outcome"],
    )
    .map_err(std::io::Error::other)?;
    registry
        .register(Box::new(charges_total.clone()))
        .map_err(std::io::Error::other)?;
    let stub = Stub {
        ledger: Arc::new(Mutex::new(Ledger {
            charges: HashMap::new(),
            key_of_charge: HashMap::new(),
            refunds: HashMap::new(),
            next: 1,
        })),
        behaviour: Arc::new(Mutex::new(config.behaviour)),
        charges_total,
    };
    let app = Router::new()
        .route("/v1/charges", post(create_charge).get(list_charges))
        .route("/v1/charges/{id}", get(get_charge))
        .route("/v1/refunds", post(create_refund))
        .route("/admin/behaviour", get(get_behaviour).put(put_behaviour))
        .with_state(stub)
        .merge(ops::router(
            registry,
            Arc::new(|| Box::pin(async { Ok(()) })),
        ));
    let listener = tokio::net::TcpListener::bind(config.addr).await?;
    let local_addr = listener.local_addr()?;
    tracing::info!(%local_addr, "payment stub listening");
    let task = tokio::spawn(ops::serve(listener, app, shutdown));
    Ok(PaymentStub { local_addr, task })
}

fn bad_json(rejection: JsonRejection) -> Problem {
    Problem::new(
        StatusCode::BAD_REQUEST,
        "invalid-body",
        rejection.body_text(),
    )
}

fn idempotency_key(headers: &HeaderMap) -> Result<String, Problem> {
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

fn latency(stub: &Stub) -> Duration {
    Duration::from_millis(stub.behaviour.lock().map(|b| b.latency_ms).unwrap_or(0))
}

async fn create_charge(
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
    // The processor's own work takes time: the card network round trip.
    tokio::time::sleep(latency(&stub)).await;
    let rate = stub.behaviour.lock().map(|b| b.decline_rate).unwrap_or(0.0);
    let mut ledger = stub.ledger()?;
    let (charge, replayed) = match ledger.charges.get(&key) {
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
            ledger.next += 1;
            let charge = Charge {
                id: id.clone(),
                idempotency_key: key.clone(),
                amount_cents: request.amount_cents,
                currency: request.currency.clone(),
                status: if declines(&key, rate) {
                    ChargeStatus::Declined
                } else {
                    ChargeStatus::Succeeded
                },
                refunded: false,
                metadata: request.metadata.clone(),
                created_at_ms: clock::now_ms(),
            };
            ledger.key_of_charge.insert(id, key.clone());
            ledger.charges.insert(key, (request, charge.clone()));
            (charge, false)
        }
    };
    drop(ledger);
    let outcome = match (charge.status, replayed) {
        (_, true) => "replayed",
        (ChargeStatus::Succeeded, false) => "succeeded",
        (ChargeStatus::Declined, false) => "declined",
    };
    stub.charges_total.with_label_values(&[outcome]).inc();
    let status = match charge.status {
        ChargeStatus::Succeeded => StatusCode::CREATED,
        ChargeStatus::Declined => StatusCode::PAYMENT_REQUIRED,
    };
    Ok((status, Json(charge)).into_response())
}

#[derive(Deserialize)]
struct ChargeFilter {
    sale_id: Option<String>,
    idempotency_key: Option<String>,
}

async fn list_charges(
    State(stub): State<Stub>,
    Query(filter): Query<ChargeFilter>,
) -> Result<Json<Vec<Charge>>, Problem> {
    let ledger = stub.ledger()?;
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

async fn get_charge(
    State(stub): State<Stub>,
    Path(id): Path<String>,
) -> Result<Json<Charge>, Problem> {
    let ledger = stub.ledger()?;
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

async fn create_refund(
    State(stub): State<Stub>,
    body: Result<Json<RefundRequest>, JsonRejection>,
) -> Result<Json<Refund>, Problem> {
    let Json(request) = body.map_err(bad_json)?;
    tokio::time::sleep(latency(&stub)).await;
    let mut ledger = stub.ledger()?;
    if let Some(refund) = ledger.refunds.get(&request.charge_id) {
        return Ok(Json(refund.clone()));
    }
    let key = ledger
        .key_of_charge
        .get(&request.charge_id)
        .cloned()
        .ok_or_else(|| {
            Problem::new(
                StatusCode::NOT_FOUND,
                "no-such-charge",
                format!("no charge {}", request.charge_id),
            )
        })?;
    let charge = ledger
        .charges
        .get_mut(&key)
        .map(|(_, charge)| charge)
        .ok_or_else(|| Problem::new(StatusCode::NOT_FOUND, "no-such-charge", "charge vanished"))?;
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
    charge.refunded = true;
    let refund = Refund {
        id: format!("re_{}", charge.id.trim_start_matches("ch_")),
        charge_id: charge.id.clone(),
        amount_cents: charge.amount_cents,
    };
    ledger.refunds.insert(request.charge_id, refund.clone());
    Ok(Json(refund))
}

async fn get_behaviour(State(stub): State<Stub>) -> Json<StubBehaviour> {
    Json(
        stub.behaviour
            .lock()
            .map(|b| b.clone())
            .unwrap_or(StubBehaviour {
                decline_rate: 0.0,
                latency_ms: 0,
            }),
    )
}

async fn put_behaviour(
    State(stub): State<Stub>,
    body: Result<Json<StubBehaviour>, JsonRejection>,
) -> Result<Json<StubBehaviour>, Problem> {
    let Json(wanted) = body.map_err(bad_json)?;
    if !(0.0..=1.0).contains(&wanted.decline_rate) {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-behaviour",
            "decline_rate must be between 0 and 1",
        ));
    }
    if let Ok(mut behaviour) = stub.behaviour.lock() {
        *behaviour = wanted.clone();
    }
    tracing::info!(?wanted, "payment behaviour changed");
    Ok(Json(wanted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declines_follow_the_rate_and_the_key() {
        let keys: Vec<String> = (0..10_000).map(|i| format!("key-{i}")).collect();
        let declined = keys.iter().filter(|k| declines(k, 0.2)).count();
        assert!(
            (1_700..2_300).contains(&declined),
            "{declined} of 10000 at 20%"
        );
        assert!(keys.iter().all(|k| declines(k, 0.2) == declines(k, 0.2)));
        assert!(!keys.iter().any(|k| declines(k, 0.0)));
        assert!(keys.iter().all(|k| declines(k, 1.0)));
    }
}
