//! How the stub fails the way processors fail: declines decided by the key,
//! errors that did nothing, the card network's latency, outages; and the
//! admin endpoint that changes it at run time.

use axum::Json;
use axum::extract::{Request, State, rejection::JsonRejection};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use flashsale_core::payment::StubBehaviour;
use flashsale_core::service::problem::Problem;

use crate::Stub;
use crate::api::bad_json;

/// FNV-1a followed by MurmurHash3's 64-bit finalizer: stable across runs
/// and platforms (unlike `DefaultHasher`), and well spread even for short
/// keys that differ in one character, which FNV alone is not.
pub(crate) fn stable_hash(bytes: &[u8]) -> u64 {
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

/// What goes wrong before a request is even looked at: an outage, or an
/// error that does nothing (a retry may pass). Then the card network's
/// round trip, drawn from the latency distribution.
pub(crate) async fn failures(State(stub): State<Stub>, request: Request, next: Next) -> Response {
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

pub(crate) async fn get_behaviour(State(stub): State<Stub>) -> Json<StubBehaviour> {
    Json(stub.behaviour())
}

pub(crate) async fn put_behaviour(
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
