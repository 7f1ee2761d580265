//! Identifiers and quantities that can only exist in a valid form.
//!
//! Everything past the gateway holds these types, never raw strings, so a
//! malformed sku or a zero quantity cannot reach Kafka, Redis or DynamoDB.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why an identifier or quantity was refused, worded for the buyer who sent it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    #[error("{field} must not be empty")]
    Empty { field: &'static str },
    #[error("{field} is longer than {max} characters")]
    TooLong { field: &'static str, max: usize },
    #[error("{field} may only contain {allowed}")]
    BadCharacters {
        field: &'static str,
        allowed: &'static str,
    },
    #[error("quantity must be between 1 and {max}, got {got}")]
    QuantityOutOfRange { got: i64, max: u32 },
    #[error("{0:?} is not a request id (a UUID)")]
    NotARequestId(String),
}

/// Most units one purchase may ask for; the per-sale limit may be lower.
pub const MAX_QUANTITY: u32 = 100;

const SKU_MAX: usize = 64;
const USER_MAX: usize = 128;
const IDEMPOTENCY_KEY_MAX: usize = 255;

/// A stock-keeping unit. Letters, digits, `-`, `_` and `.`: it becomes part
/// of Redis keys (inside a `{hash tag}`), Kafka keys and DynamoDB keys, so
/// braces, spaces and control characters are kept out.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sku(String);

impl Sku {
    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        check_text("sku", raw, SKU_MAX, |c| {
            c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
        })
        .map_err(|e| match e {
            InvalidInput::BadCharacters { field, .. } => InvalidInput::BadCharacters {
                field,
                allowed: "ASCII letters, digits, '-', '_' and '.'",
            },
            other => other,
        })?;
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The buyer. Any printable text without control characters, so it can be
/// a customer number, an e-mail address or an opaque token.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserId(String);

impl UserId {
    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        check_text("user_id", raw, USER_MAX, |c| !c.is_control())?;
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Units in one purchase, `1..=MAX_QUANTITY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "u32")]
pub struct Quantity(u32);

impl Quantity {
    pub fn new(raw: i64) -> Result<Self, InvalidInput> {
        match u32::try_from(raw) {
            Ok(q) if (1..=MAX_QUANTITY).contains(&q) => Ok(Self(q)),
            _ => Err(InvalidInput::QuantityOutOfRange {
                got: raw,
                max: MAX_QUANTITY,
            }),
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

/// The one id of a purchase: request id, reservation id, order id and the
/// payment idempotency key all at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(Uuid);

/// Namespace of the UUIDv5 ids derived from `(user_id, Idempotency-Key)`.
/// Changing it would give every retried purchase a new id: never change it.
const IDEMPOTENT_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_9a3e_57b2_4c1d_9e0a_3d5f_1b7c_2a48);

impl RequestId {
    /// A fresh, time-ordered id for a purchase sent without an idempotency key.
    pub fn fresh() -> Self {
        Self(Uuid::now_v7())
    }

    /// The id a retried POST must get again: same user and key, same id.
    /// The length prefix keeps `("ab","c")` and `("a","bc")` apart.
    pub fn derive(user: &UserId, key: &IdempotencyKey) -> Self {
        let mut name = Vec::with_capacity(user.0.len() + key.0.len() + 8);
        name.extend_from_slice(&(user.0.len() as u64).to_be_bytes());
        name.extend_from_slice(user.0.as_bytes());
        name.extend_from_slice(key.0.as_bytes());
        Self(Uuid::new_v5(&IDEMPOTENT_NAMESPACE, &name))
    }

    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        Uuid::parse_str(raw)
            .map(Self)
            .map_err(|_| InvalidInput::NotARequestId(raw.chars().take(80).collect()))
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// The client's `Idempotency-Key` header: visible ASCII, at most 255 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        check_text("Idempotency-Key", raw, IDEMPOTENCY_KEY_MAX, |c| {
            c.is_ascii_graphic()
        })?;
        Ok(Self(raw.to_owned()))
    }
}

fn check_text(
    field: &'static str,
    raw: &str,
    max: usize,
    allowed: impl Fn(char) -> bool,
) -> Result<(), InvalidInput> {
    if raw.is_empty() {
        return Err(InvalidInput::Empty { field });
    }
    if raw.chars().count() > max {
        return Err(InvalidInput::TooLong { field, max });
    }
    if !raw.chars().all(allowed) {
        return Err(InvalidInput::BadCharacters {
            field,
            allowed: "printable characters",
        });
    }
    Ok(())
}

macro_rules! string_conversions {
    ($t:ident, $parse:ident) => {
        impl TryFrom<String> for $t {
            type Error = InvalidInput;
            fn try_from(raw: String) -> Result<Self, Self::Error> {
                Self::$parse(&raw)
            }
        }
        impl From<$t> for String {
            fn from(v: $t) -> String {
                v.0
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}
string_conversions!(Sku, parse);
string_conversions!(UserId, parse);

impl TryFrom<i64> for Quantity {
    type Error = InvalidInput;
    fn try_from(raw: i64) -> Result<Self, Self::Error> {
        Self::new(raw)
    }
}
impl From<Quantity> for u32 {
    fn from(q: Quantity) -> u32 {
        q.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sku_accepts_plain_names_and_refuses_what_would_break_a_key() {
        assert!(Sku::parse("tv-55.black_2026").is_ok());
        for bad in ["", "a b", "{x}", "ünï", "a\nb", &"x".repeat(65)] {
            assert!(Sku::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn quantity_bounds() {
        assert!(Quantity::new(0).is_err());
        assert!(Quantity::new(-1).is_err());
        assert!(Quantity::new(i64::MAX).is_err());
        assert!(Quantity::new(MAX_QUANTITY as i64 + 1).is_err());
        assert_eq!(Quantity::new(1).map(Quantity::get), Ok(1));
        assert_eq!(Quantity::new(100).map(Quantity::get), Ok(100));
    }

    #[test]
    fn derived_ids_are_stable_per_user_and_key() {
        let key = IdempotencyKey::parse("k-1").unwrap();
        let alice = UserId::parse("alice").unwrap();
        let bob = UserId::parse("bob").unwrap();
        assert_eq!(
            RequestId::derive(&alice, &key),
            RequestId::derive(&alice, &key)
        );
        assert_ne!(
            RequestId::derive(&alice, &key),
            RequestId::derive(&bob, &key)
        );
        // Length prefix: the split between user and key matters.
        let ab = UserId::parse("ab").unwrap();
        let a = UserId::parse("a").unwrap();
        assert_ne!(
            RequestId::derive(&ab, &IdempotencyKey::parse("c").unwrap()),
            RequestId::derive(&a, &IdempotencyKey::parse("bc").unwrap())
        );
    }

    #[test]
    fn request_id_round_trips_through_text() {
        let id = RequestId::fresh();
        assert_eq!(RequestId::parse(&id.to_string()), Ok(id));
        assert!(RequestId::parse("not-a-uuid").is_err());
    }
}
