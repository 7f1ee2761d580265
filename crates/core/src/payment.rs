//! The payment service's API, and the client the order-worker and the
//! audit use. The shapes follow a real card processor: the idempotency key
//! goes in a header, a decline is `402` with the charge in the body, and a
//! charge can be looked up and refunded.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::RequestId;

pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargeMetadata {
    pub order_id: String,
    pub sku: String,
    pub sale_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargeRequest {
    pub amount_cents: u64,
    pub currency: String,
    pub metadata: ChargeMetadata,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChargeStatus {
    Succeeded,
    Declined,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    pub id: String,
    pub idempotency_key: String,
    pub amount_cents: u64,
    pub currency: String,
    pub status: ChargeStatus,
    pub refunded: bool,
    pub metadata: ChargeMetadata,
    pub created_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundRequest {
    pub charge_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refund {
    pub id: String,
    pub charge_id: String,
    pub amount_cents: u64,
}

/// How long the stub takes to answer, as a distribution: card networks have
/// long tails, and a saga must be tested against them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LatencyModel {
    Fixed {
        ms: u64,
    },
    /// Evenly spread between the two.
    Uniform {
        min_ms: u64,
        max_ms: u64,
    },
    /// Log-normal with this median and 99th percentile.
    LogNormal {
        p50_ms: f64,
        p99_ms: f64,
    },
}

impl LatencyModel {
    /// The latency at quantile `q` in `(0, 1)`; drawing `q` uniformly
    /// draws from the distribution.
    pub fn at(&self, q: f64) -> Duration {
        let q = q.clamp(1e-9, 1.0 - 1e-9);
        let ms = match *self {
            Self::Fixed { ms } => ms as f64,
            Self::Uniform { min_ms, max_ms } => {
                min_ms as f64 + (max_ms.max(min_ms) - min_ms) as f64 * q
            }
            Self::LogNormal { p50_ms, p99_ms } => {
                // ln X ~ N(mu, sigma): the median is e^mu, and the 99th
                // percentile e^(mu + 2.3263 sigma).
                let mu = p50_ms.max(1e-3).ln();
                let sigma = ((p99_ms.max(p50_ms).max(1e-3)).ln() - mu) / Z_99;
                (mu + sigma * standard_normal_quantile(q)).exp()
            }
        };
        Duration::from_secs_f64(ms.max(0.0) / 1000.0)
    }

    /// Whether the parameters make sense (non-negative, ordered, finite).
    pub fn is_valid(&self) -> bool {
        match *self {
            Self::Fixed { .. } => true,
            Self::Uniform { min_ms, max_ms } => min_ms <= max_ms,
            Self::LogNormal { p50_ms, p99_ms } => {
                p50_ms.is_finite() && p99_ms.is_finite() && p50_ms > 0.0 && p99_ms >= p50_ms
            }
        }
    }
}

const Z_99: f64 = 2.326_347_874;

/// The standard normal distribution's quantile function (Acklam's rational
/// approximation, relative error below 1.2e-9): enough for latencies.
fn standard_normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// Run-time behaviour of the payment stub, changeable through its admin API
/// (`PUT /admin/behaviour`). Every field but the two first may be left out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StubBehaviour {
    /// Fraction of charges declined, chosen by the idempotency key so a
    /// retry gets the same answer.
    pub decline_rate: f64,
    /// Added to every charge and refund.
    pub latency: LatencyModel,
    /// Fraction of requests answered `500` or `503` without doing anything:
    /// drawn per attempt, so a retry may pass.
    #[serde(default)]
    pub error_rate: f64,
    /// Fraction of charges that are made (and recorded) but answered only
    /// after `hang_ms`, past any client's timeout: the ambiguous case a
    /// client resolves by looking the charge up by its idempotency key.
    #[serde(default)]
    pub timeout_rate: f64,
    #[serde(default = "default_hang_ms")]
    pub hang_ms: u64,
    /// Every request answered `503` at once, as in an outage.
    #[serde(default)]
    pub outage: bool,
}

fn default_hang_ms() -> u64 {
    30_000
}

impl StubBehaviour {
    /// Declines at `decline_rate`, answers after a fixed `latency_ms`,
    /// never fails otherwise.
    pub fn simple(decline_rate: f64, latency_ms: u64) -> Self {
        Self {
            decline_rate,
            latency: LatencyModel::Fixed { ms: latency_ms },
            error_rate: 0.0,
            timeout_rate: 0.0,
            hang_ms: default_hang_ms(),
            outage: false,
        }
    }

    /// What is wrong with it, if anything.
    pub fn problem(&self) -> Option<String> {
        let rates = [
            ("decline_rate", self.decline_rate),
            ("error_rate", self.error_rate),
            ("timeout_rate", self.timeout_rate),
        ];
        for (name, rate) in rates {
            if !(0.0..=1.0).contains(&rate) {
                return Some(format!("{name} must be between 0 and 1, got {rate}"));
            }
        }
        (!self.latency.is_valid())
            .then(|| format!("latency {:?} is not a distribution", self.latency))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PaymentError {
    /// Worth retrying: timeout, connection refused, `5xx`. A timed-out charge
    /// may still have happened; retrying with the same key is safe.
    #[error("payment service unavailable: {0}")]
    Transient(String),
    /// The service refused the request; retrying will not help.
    #[error("payment service refused the request: {0}")]
    Refused(String),
}

#[derive(Debug, Clone)]
pub enum ChargeOutcome {
    Succeeded(Charge),
    Declined(Charge),
}

#[derive(Debug, Clone)]
pub struct PaymentClient {
    http: reqwest::Client,
    base: String,
}

impl PaymentClient {
    pub fn new(base_url: &str, timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .pool_max_idle_per_host(256)
            .build()
            .unwrap_or_default();
        Self {
            http,
            base: base_url.trim_end_matches('/').to_owned(),
        }
    }

    /// Charges once per `key`: the same key always names the same charge.
    pub async fn charge(
        &self,
        key: RequestId,
        request: &ChargeRequest,
    ) -> Result<ChargeOutcome, PaymentError> {
        let response = self
            .http
            .post(format!("{}/v1/charges", self.base))
            .header(IDEMPOTENCY_KEY, key.to_string())
            .json(request)
            .send()
            .await
            .map_err(transient)?;
        let charge: Charge = read(response, &[402]).await?;
        Ok(match charge.status {
            ChargeStatus::Succeeded => ChargeOutcome::Succeeded(charge),
            ChargeStatus::Declined => ChargeOutcome::Declined(charge),
        })
    }

    /// The charge made under `key`, if any: how a client resolves a charge
    /// whose answer it never got (a timeout) before deciding to retry.
    pub async fn find_charge(&self, key: RequestId) -> Result<Option<Charge>, PaymentError> {
        let response = self
            .http
            .get(format!("{}/v1/charges", self.base))
            .query(&[("idempotency_key", key.to_string())])
            .send()
            .await
            .map_err(transient)?;
        let found: Vec<Charge> = read(response, &[]).await?;
        Ok(found.into_iter().next())
    }

    pub async fn refund(&self, charge_id: &str) -> Result<Refund, PaymentError> {
        let response = self
            .http
            .post(format!("{}/v1/refunds", self.base))
            .header(IDEMPOTENCY_KEY, format!("refund-{charge_id}"))
            .json(&RefundRequest {
                charge_id: charge_id.to_owned(),
            })
            .send()
            .await
            .map_err(transient)?;
        read(response, &[]).await
    }

    /// Every charge made for one sale, for the audit.
    pub async fn charges_of_sale(&self, sale_id: &str) -> Result<Vec<Charge>, PaymentError> {
        let response = self
            .http
            .get(format!("{}/v1/charges", self.base))
            .query(&[("sale_id", sale_id)])
            .send()
            .await
            .map_err(transient)?;
        read(response, &[]).await
    }

    pub async fn set_behaviour(&self, behaviour: &StubBehaviour) -> Result<(), PaymentError> {
        let response = self
            .http
            .put(format!("{}/admin/behaviour", self.base))
            .json(behaviour)
            .send()
            .await
            .map_err(transient)?;
        read::<StubBehaviour>(response, &[]).await.map(|_| ())
    }
}

fn transient(error: reqwest::Error) -> PaymentError {
    PaymentError::Transient(error.to_string())
}

/// Reads a JSON body from a `2xx`, or from one of the `also_ok` statuses.
async fn read<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
    also_ok: &[u16],
) -> Result<T, PaymentError> {
    let status = response.status();
    if status.is_success() || also_ok.contains(&status.as_u16()) {
        return response.json().await.map_err(transient);
    }
    let body = response.text().await.unwrap_or_default();
    let detail = format!("{status}: {}", body.chars().take(300).collect::<String>());
    if status.is_server_error() || status.as_u16() == 429 {
        Err(PaymentError::Transient(detail))
    } else {
        Err(PaymentError::Refused(detail))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(d: Duration) -> f64 {
        d.as_secs_f64() * 1000.0
    }

    #[test]
    fn log_normal_has_the_asked_median_and_tail() {
        let model = LatencyModel::LogNormal {
            p50_ms: 20.0,
            p99_ms: 200.0,
        };
        assert!((ms(model.at(0.5)) - 20.0).abs() < 0.01);
        assert!((ms(model.at(0.99)) - 200.0).abs() < 0.5);
        assert!(ms(model.at(0.01)) < 20.0 && ms(model.at(0.01)) > 1.0);
        // Quantiles drawn evenly: the sample's own percentiles match.
        let mut sample: Vec<f64> = (1..10_000)
            .map(|i| ms(model.at(i as f64 / 10_000.0)))
            .collect();
        sample.sort_by(f64::total_cmp);
        assert!((sample[4_999] - 20.0).abs() < 0.1);
        assert!((sample[9_899] - 200.0).abs() / 200.0 < 0.01);
    }

    #[test]
    fn fixed_and_uniform() {
        assert_eq!(
            LatencyModel::Fixed { ms: 7 }.at(0.9),
            Duration::from_millis(7)
        );
        let uniform = LatencyModel::Uniform {
            min_ms: 10,
            max_ms: 30,
        };
        assert_eq!(ms(uniform.at(0.5)).round(), 20.0);
        assert!(ms(uniform.at(0.0)) >= 10.0 && ms(uniform.at(1.0)) <= 30.0);
        assert!(
            !LatencyModel::Uniform {
                min_ms: 5,
                max_ms: 1
            }
            .is_valid()
        );
        assert!(
            !LatencyModel::LogNormal {
                p50_ms: 10.0,
                p99_ms: 5.0
            }
            .is_valid()
        );
    }

    #[test]
    fn behaviour_rates_are_checked_and_optional_fields_default() {
        let parsed: StubBehaviour =
            serde_json::from_str(r#"{"decline_rate":0.1,"latency":{"kind":"fixed","ms":5}}"#)
                .expect("the short form parses");
        assert_eq!(parsed, StubBehaviour::simple(0.1, 5));
        assert!(parsed.problem().is_none());
        let mut bad = parsed.clone();
        bad.timeout_rate = 1.5;
        assert!(bad.problem().is_some_and(|p| p.contains("timeout_rate")));
    }
}
