//! The states a purchase goes through and the rule that a state never goes
//! backwards, whatever order the workers' writes arrive in.

pub mod board;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PurchaseState {
    Queued,
    /// In its sku's line: no unit is free for it now, but units held by
    /// buyers ahead may still come back, and the first goes to the head.
    Waiting,
    Reserved,
    Paid,
    Confirmed,
    Rejected,
    Cancelled,
}

impl PurchaseState {
    pub const ALL: [PurchaseState; 7] = [
        Self::Queued,
        Self::Waiting,
        Self::Reserved,
        Self::Paid,
        Self::Confirmed,
        Self::Rejected,
        Self::Cancelled,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Confirmed | Self::Rejected | Self::Cancelled)
    }

    /// Progress along the life of a purchase. A write of a lower rank than
    /// the stored one is ignored (a redelivered message must not move a
    /// confirmed purchase back to `reserved`); terminal states share the top
    /// rank so the first terminal state written wins.
    pub fn rank(self) -> u8 {
        match self {
            Self::Queued => 0,
            Self::Waiting => 1,
            Self::Reserved => 2,
            Self::Paid => 3,
            Self::Confirmed | Self::Rejected | Self::Cancelled => 4,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Waiting => "waiting",
            Self::Reserved => "reserved",
            Self::Paid => "paid",
            Self::Confirmed => "confirmed",
            Self::Rejected => "rejected",
            Self::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for PurchaseState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown purchase state {0:?}")]
pub struct UnknownState(String);

impl FromStr for PurchaseState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

/// Why a purchase was rejected or cancelled.
pub mod reason {
    pub const SOLD_OUT: &str = "sold_out";
    pub const USER_LIMIT: &str = "user_limit";
    pub const SALE_NOT_ACTIVE: &str = "sale_not_active";
    pub const STALE: &str = "stale";
    pub const PAYMENT_DECLINED: &str = "payment_declined";
    pub const PAYMENT_FAILED: &str = "payment_failed";
    pub const RESERVATION_EXPIRED: &str = "reservation_expired";
    /// The payment service answered nothing, past the reservation's
    /// deadline and the retry deadline after it.
    pub const PAYMENT_UNAVAILABLE: &str = "payment_unavailable";
    /// The buyer's Idempotency-Key named an earlier purchase (another sku,
    /// sale or quantity) that had left the status board.
    pub const IDEMPOTENCY_KEY_REUSED: &str = "idempotency_key_reused";
}

/// A purchase as the buyer sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PurchaseStatus {
    pub request_id: String,
    pub sku: String,
    pub user_id: String,
    pub quantity: u32,
    pub status: PurchaseState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Unix ms of the last state change.
    pub updated_at_ms: u64,
    /// Partition and offset of the purchase's record in `purchase-requests`.
    #[serde(skip)]
    pub record: Option<(i32, i64)>,
    /// While `queued`: about how many purchases of its partition the
    /// shop-workers still have to answer, this one included (1 = next).
    /// While `waiting`: its place in the sku's line (1 = the next unit that
    /// comes back is this buyer's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u64>,
    /// While `waiting`: units held by buyers who have not paid yet, the
    /// only ones that can still come back to the line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub units_may_return: Option<i64>,
    /// While `waiting`: the buyer knows whether they got a unit within this
    /// many seconds at the latest (when the reservations now held are paid
    /// or expire); usually much sooner, as payments settle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_at_most_s: Option<u64>,
    /// Since when (unix ms) the purchase waited in its sku's line, if it
    /// ever did; kept once it is served or turned away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_since_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_only_rise_to_terminal() {
        for s in PurchaseState::ALL {
            assert_eq!(s.is_terminal(), s.rank() == 4, "{s}");
            assert_eq!(s.as_str().parse::<PurchaseState>().ok(), Some(s));
        }
        assert!(PurchaseState::Queued.rank() < PurchaseState::Waiting.rank());
        assert!(PurchaseState::Waiting.rank() < PurchaseState::Reserved.rank());
        assert!(PurchaseState::Reserved.rank() < PurchaseState::Paid.rank());
        assert!("shipped".parse::<PurchaseState>().is_err());
    }
}
