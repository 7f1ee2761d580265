//! payment-stub: a payment service that behaves like a card processor.
//!
//! Charges are idempotent by the `Idempotency-Key` header: the same key and
//! body give back the first charge, the same key with another body is
//! refused. Whether a charge is declined is decided by the key itself, so a
//! retry after a timeout can never turn a decline into a success.
//!
//! It fails the way processors fail, at rates set by environment or at run
//! time through `PUT /admin/behaviour`: latency from a distribution, `500`
//! and `503` answers that did nothing, charges that are made but answered
//! only after the client gave up (the ambiguous case: look the charge up by
//! its key), and outages.
//!
//! Every charge and refund is appended to a ledger file and flushed to disk
//! before it is answered, and the file is replayed at start: a restarted
//! stub still knows every charge it ever answered.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, Request, State, rejection::JsonRejection};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flashsale_core::payment::{
    Charge, ChargeRequest, ChargeStatus, IDEMPOTENCY_KEY, LatencyModel, Refund, RefundRequest,
    StubBehaviour,
};
use flashsale_core::service::problem::Problem;
use flashsale_core::service::settings::{Env, SettingError};
use flashsale_core::{clock, service::ops};
use prometheus::{IntCounterVec, Opts, Registry};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// Settings of the payment stub.
#[derive(Debug, Clone)]
pub struct Config {
    /// `FLASHSALE_PAYMENT_ADDR`: where it listens.
    pub addr: SocketAddr,
    /// `FLASHSALE_PAYMENT_DECLINE_RATE`, `_LATENCY_MS` (the median),
    /// `_LATENCY_P99_MS` (log-normal when set, fixed otherwise),
    /// `_ERROR_RATE`, `_TIMEOUT_RATE`, `_HANG_MS`, `_OUTAGE`.
    pub behaviour: StubBehaviour,
    /// `FLASHSALE_PAYMENT_LEDGER`: the ledger file (default
    /// `$FLASHSALE_STATE_DIR/payment-ledger.jsonl`); empty: memory only.
    pub ledger: Option<PathBuf>,
}

impl Config {
    pub fn from_env(env: &Env) -> Result<Self, SettingError> {
        let median: u64 = env.get("PAYMENT_LATENCY_MS", 20)?;
        let p99: Option<f64> = match env.string("PAYMENT_LATENCY_P99_MS", "").as_str() {
            "" => None,
            _ => Some(env.get("PAYMENT_LATENCY_P99_MS", 0.0)?),
        };
        let state = env.string("STATE_DIR", ".flashsale/demo");
        let ledger = env.string("PAYMENT_LEDGER", &format!("{state}/payment-ledger.jsonl"));
        Ok(Self {
            addr: env.get("PAYMENT_ADDR", SocketAddr::from(([127, 0, 0, 1], 18081)))?,
            behaviour: StubBehaviour {
                decline_rate: env.fraction("PAYMENT_DECLINE_RATE", 0.0)?,
                latency: match p99 {
                    Some(p99_ms) => LatencyModel::LogNormal {
                        p50_ms: median as f64,
                        p99_ms,
                    },
                    None => LatencyModel::Fixed { ms: median },
                },
                error_rate: env.fraction("PAYMENT_ERROR_RATE", 0.0)?,
                timeout_rate: env.fraction("PAYMENT_TIMEOUT_RATE", 0.0)?,
                hang_ms: env.get("PAYMENT_HANG_MS", 30_000)?,
                outage: env.get("PAYMENT_OUTAGE", false)?,
            },
            ledger: (!ledger.is_empty()).then(|| PathBuf::from(ledger)),
        })
    }
}

/// One line of the ledger file. Each lives only while it is written or
/// replayed, so the size of the larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Entry {
    Charge {
        request: ChargeRequest,
        charge: Charge,
    },
    Refund {
        refund: Refund,
    },
}

struct Ledger {
    /// By idempotency key: the request as first sent, and its charge.
    charges: HashMap<String, (ChargeRequest, Charge)>,
    key_of_charge: HashMap<String, String>,
    refunds: HashMap<String, Refund>,
    next: u64,
    file: Option<Arc<Mutex<std::fs::File>>>,
}

impl Ledger {
    fn apply(&mut self, entry: Entry) {
        match entry {
            Entry::Charge { request, charge } => {
                let number = charge
                    .id
                    .trim_start_matches("ch_")
                    .parse::<u64>()
                    .unwrap_or(0);
                self.next = self.next.max(number + 1);
                self.key_of_charge
                    .insert(charge.id.clone(), charge.idempotency_key.clone());
                self.charges
                    .insert(charge.idempotency_key.clone(), (request, charge));
            }
            Entry::Refund { refund } => {
                if let Some((_, charge)) = self
                    .key_of_charge
                    .get(&refund.charge_id)
                    .and_then(|key| self.charges.get_mut(key))
                {
                    charge.refunded = true;
                }
                self.refunds.insert(refund.charge_id.clone(), refund);
            }
        }
    }

    /// Reads the ledger file back, or starts one.
    fn open(path: Option<&std::path::Path>) -> std::io::Result<Self> {
        let mut ledger = Self {
            charges: HashMap::new(),
            key_of_charge: HashMap::new(),
            refunds: HashMap::new(),
            next: 1,
            file: None,
        };
        let Some(path) = path else {
            return Ok(ledger);
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        match std::fs::read_to_string(path) {
            Ok(text) => {
                for (n, line) in text.lines().enumerate() {
                    match serde_json::from_str::<Entry>(line) {
                        Ok(entry) => ledger.apply(entry),
                        // A line cut short by a crash mid-write was never
                        // answered: nobody knows of it.
                        Err(error) => {
                            tracing::warn!(line = n + 1, %error, "skipping a torn ledger line")
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        ledger.file = Some(Arc::new(Mutex::new(file)));
        tracing::info!(path = %path.display(), charges = ledger.charges.len(), "payment ledger loaded");
        Ok(ledger)
    }
}

#[derive(Clone)]
struct Stub {
    ledger: Arc<tokio::sync::Mutex<Ledger>>,
    behaviour: Arc<Mutex<StubBehaviour>>,
    /// Draws for errors, timeouts and latency: a counter, hashed.
    draws: Arc<AtomicU64>,
    charges_total: IntCounterVec,
}

impl Stub {
    fn behaviour(&self) -> StubBehaviour {
        self.behaviour
            .lock()
            .map(|b| b.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// A number in [0, 1), different on every call.
    fn draw(&self, salt: &str) -> f64 {
        let n = self.draws.fetch_add(1, Ordering::Relaxed);
        stable_hash(format!("{salt}/{n}").as_bytes()) as f64 / (u64::MAX as f64 + 1.0)
    }

    /// Writes `entry` to the ledger file and flushes it to disk: nothing is
    /// answered that a restart would forget.
    async fn persist(&self, ledger: &Ledger, entry: &Entry) -> Result<(), Problem> {
        let Some(file) = ledger.file.clone() else {
            return Ok(());
        };
        let mut line = serde_json::to_vec(entry).map_err(|e| ledger_down(e.to_string()))?;
        line.push(b'\n');
        let written = tokio::task::spawn_blocking(move || {
            let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
            file.write_all(&line)?;
            file.sync_data()
        })
        .await;
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ledger_down(e.to_string())),
            Err(e) => Err(ledger_down(e.to_string())),
        }
    }
}

fn ledger_down(error: String) -> Problem {
    tracing::error!(%error, "cannot write the payment ledger");
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the payment ledger is unavailable",
    )
    .retry_after(1)
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

#[derive(Debug)]
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
    let ledger = Ledger::open(config.ledger.as_deref())?;
    let stub = Stub {
        ledger: Arc::new(tokio::sync::Mutex::new(ledger)),
        behaviour: Arc::new(Mutex::new(config.behaviour)),
        draws: Arc::new(AtomicU64::new(0)),
        charges_total,
    };
    let api = Router::new()
        .route("/v1/charges", post(create_charge).get(list_charges))
        .route("/v1/charges/{id}", get(get_charge))
        .route("/v1/refunds", post(create_refund))
        .layer(middleware::from_fn_with_state(stub.clone(), failures));
    let app = api
        .route("/admin/behaviour", get(get_behaviour).put(put_behaviour))
        .with_state(stub)
        .merge(ops::router(
            registry,
            Arc::new(|| Box::pin(async { Ok(String::new()) })),
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

/// What goes wrong before a request is even looked at: an outage, or an
/// error that does nothing (a retry may pass). Then the card network's
/// round trip, drawn from the latency distribution.
async fn failures(State(stub): State<Stub>, request: Request, next: Next) -> Response {
    let behaviour = stub.behaviour();
    if behaviour.outage {
        stub.charges_total.with_label_values(&["outage"]).inc();
        return Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "outage",
            "the payment service is down",
        )
        .into_response();
    }
    let roll = stub.draw("error");
    if roll < behaviour.error_rate {
        stub.charges_total.with_label_values(&["error"]).inc();
        // Half of them 500, half 503: clients must treat both as transient.
        let status = if roll < behaviour.error_rate / 2.0 {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        return Problem::new(
            status,
            "processor-error",
            "the processor failed; nothing was done",
        )
        .into_response();
    }
    tokio::time::sleep(behaviour.latency.at(stub.draw("latency"))).await;
    next.run(request).await
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
async fn record_charge(
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
            stub.persist(&ledger, &entry).await?;
            ledger.apply(entry);
            (charge, false)
        }
    };
    Ok(answer)
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

async fn get_charge(
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

async fn create_refund(
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
async fn record_refund(stub: Stub, charge_id: String) -> Result<Refund, Problem> {
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
    stub.persist(&ledger, &entry).await?;
    ledger.apply(entry);
    Ok(refund)
}

async fn get_behaviour(State(stub): State<Stub>) -> Json<StubBehaviour> {
    Json(stub.behaviour())
}

async fn put_behaviour(
    State(stub): State<Stub>,
    body: Result<Json<StubBehaviour>, JsonRejection>,
) -> Result<Json<StubBehaviour>, Problem> {
    let Json(wanted) = body.map_err(bad_json)?;
    if let Some(problem) = wanted.problem() {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-behaviour",
            problem,
        ));
    }
    *stub.behaviour.lock().unwrap_or_else(|e| e.into_inner()) = wanted.clone();
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
