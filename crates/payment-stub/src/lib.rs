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

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::middleware;
use axum::routing::{get, post};
use flashsale_core::payment::{LatencyModel, StubBehaviour};
use flashsale_core::service::metrics::Registrar;
use flashsale_core::service::ops;
use flashsale_core::service::settings::{Env, SettingError};
use prometheus::{IntCounterVec, Registry};
use tokio_util::sync::CancellationToken;

mod api;
mod faults;
mod ledger;

use api::{create_charge, create_refund, get_charge, list_charges};
pub use faults::declines;
use faults::{failures, get_behaviour, put_behaviour, stable_hash};
use ledger::Ledger;

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
}

#[derive(Debug)]
pub struct PaymentStub {
    pub local_addr: SocketAddr,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Binds `config.addr` (port 0 picks a free one) and serves until `shutdown`.
pub async fn start(config: Config, shutdown: CancellationToken) -> std::io::Result<PaymentStub> {
    let registry = Registry::new();
    let charges_total = Registrar::new(&registry)
        .counters(
            "payment_charges_total",
            "Charge requests by outcome",
            &["outcome"],
        )
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
