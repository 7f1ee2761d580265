//! The JSON records on the three topics. Each carries `v`, the schema
//! version, so a consumer can refuse (dead-letter) what it does not know
//! instead of misreading it.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::ids::{Quantity, RequestId, Sku, UserId};

pub const SCHEMA_VERSION: u32 = 1;

/// On `purchase-requests`, key = sku: one partition per sku keeps arrival order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PurchaseRequest {
    pub v: u32,
    pub request_id: RequestId,
    pub sku: Sku,
    pub user_id: UserId,
    pub quantity: Quantity,
    /// When the gateway accepted it (Unix ms); old requests are rejected as `stale`.
    pub accepted_at_ms: u64,
}

impl PurchaseRequest {
    /// A request of the current schema.
    pub fn new(
        request_id: RequestId,
        sku: Sku,
        user_id: UserId,
        quantity: Quantity,
        accepted_at_ms: u64,
    ) -> Self {
        Self {
            v: SCHEMA_VERSION,
            request_id,
            sku,
            user_id,
            quantity,
            accepted_at_ms,
        }
    }
}

/// On `reservations`, key = request id: units held for this purchase until
/// `expires_at_ms`, to be paid for by the order stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reservation {
    pub v: u32,
    pub request_id: RequestId,
    pub sku: Sku,
    pub user_id: UserId,
    pub quantity: Quantity,
    pub amount_cents: u64,
    pub sale_id: String,
    pub expires_at_ms: u64,
}

/// On `stock-releases`, key = sku: give the units of a failed purchase back.
/// The shop-worker posts the purchase's `cancelled` state once it has, so a
/// terminal state means the units are back in stock; hence the buyer and
/// quantity travel with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StockRelease {
    pub v: u32,
    pub request_id: RequestId,
    pub sku: Sku,
    pub user_id: UserId,
    pub quantity: Quantity,
    /// Why the purchase was cancelled (`status::reason`).
    pub reason: String,
}

/// Why a payload was refused; the text goes to the dead-letter topic.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a valid message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("schema version {found} is not supported (expected {SCHEMA_VERSION})")]
    Version { found: u32 },
    #[error("message has no payload")]
    Empty,
}

#[derive(Deserialize)]
struct VersionOnly {
    v: u32,
}

/// Parses a message, checking the schema version before the fields so a
/// future version is reported as such rather than as a missing field.
pub fn decode<T: DeserializeOwned>(payload: Option<&[u8]>) -> Result<T, DecodeError> {
    let bytes = payload.ok_or(DecodeError::Empty)?;
    let VersionOnly { v } = serde_json::from_slice(bytes)?;
    if v != SCHEMA_VERSION {
        return Err(DecodeError::Version { found: v });
    }
    Ok(serde_json::from_slice(bytes)?)
}

pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail: no maps with non-string keys.
    serde_json::to_vec(message).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_refuses_garbage_wrong_version_and_bad_fields() {
        assert!(matches!(
            decode::<StockRelease>(Some(b"{nope")),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            decode::<StockRelease>(None),
            Err(DecodeError::Empty)
        ));
        let v2 = br#"{"v":2,"request_id":"0190d6c4-7c1e-7cc0-8000-000000000000","sku":"a","user_id":"u","quantity":1,"reason":"x"}"#;
        assert!(matches!(
            decode::<StockRelease>(Some(v2)),
            Err(DecodeError::Version { found: 2 })
        ));
        let bad_sku = br#"{"v":1,"request_id":"0190d6c4-7c1e-7cc0-8000-000000000000","sku":"a b","user_id":"u","quantity":1,"reason":"x"}"#;
        assert!(decode::<StockRelease>(Some(bad_sku)).is_err());
    }

    #[test]
    fn round_trip() {
        let m = PurchaseRequest {
            v: SCHEMA_VERSION,
            request_id: RequestId::fresh(),
            sku: Sku::parse("s").unwrap(),
            user_id: UserId::parse("u").unwrap(),
            quantity: Quantity::new(2).unwrap(),
            accepted_at_ms: 5,
        };
        let back: PurchaseRequest = decode(Some(&encode(&m))).unwrap();
        assert_eq!(back, m);
    }
}
