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

/// Run-time behaviour of the payment stub, changeable through its admin API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StubBehaviour {
    /// Fraction of charges declined, chosen by the idempotency key so a
    /// retry gets the same answer.
    pub decline_rate: f64,
    /// Added to every charge and refund.
    pub latency_ms: u64,
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

#[derive(Clone)]
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
