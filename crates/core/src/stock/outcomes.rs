//! What the stock scripts answer, as types, and the parsers of their
//! replies: a reply we do not understand is an error, never a guess.

use super::*;

/// The rules of a sale as the scripts need them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SaleRules {
    /// Changes on every (re)creation, so records of an earlier sale of the
    /// same sku are told apart from this one's.
    pub sale_id: String,
    pub total: u64,
    pub per_user_limit: u64,
    pub price_cents: u64,
    pub reservation_ttl_ms: u64,
    pub starts_at_ms: u64,
    pub ends_at_ms: u64,
    /// At most `ceil(overbook x units not sold yet)` buyers may hold a unit
    /// or wait in the sku's line for one; more than 1 so that a unit given
    /// back (declined, expired) finds a buyer waiting for it.
    pub overbook: f64,
}

/// The counters of one sku at one instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StockLevels {
    pub sale_id: String,
    pub total: i64,
    pub available: i64,
    pub reserved: i64,
    pub sold: i64,
    pub sold_out: bool,
}

/// Everything Redis holds about a sku, read in one script.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SkuStatus {
    #[serde(flatten)]
    pub levels: StockLevels,
    pub closed: bool,
    pub per_user_limit: i64,
    pub reservation_ttl_ms: i64,
    pub starts_at_ms: i64,
    pub ends_at_ms: i64,
    /// Reservations past their deadline that the sweep has not released yet.
    pub overdue: i64,
    pub next_deadline_ms: Option<i64>,
    pub overbook: f64,
    /// Purchases the gateways admitted that no shop-worker has seen yet.
    pub queued: i64,
    /// Buyers waiting in the line for a unit to come back.
    pub waiting: i64,
    /// Reservations neither sold nor given back yet.
    pub holders: i64,
    /// How many buyers may hold, wait or be on their way at once:
    /// ceil(overbook x units not sold yet).
    pub line_cap: i64,
    /// No room for one more buyer: the gateways answer `sold-out`.
    pub line_full: bool,
}

impl SkuStatus {
    pub(crate) fn from_reply(reply: Vec<String>) -> Option<Self> {
        if reply.is_empty() {
            return None;
        }
        let fields: HashMap<&str, &str> = reply
            .chunks(2)
            .filter_map(|pair| match pair {
                [k, v] => Some((k.as_str(), v.as_str())),
                _ => None,
            })
            .collect();
        let num = |name: &str| fields.get(name).and_then(|v| v.parse::<i64>().ok());
        let get = |name: &str| num(name).unwrap_or(0);
        Some(Self {
            levels: StockLevels {
                sale_id: fields
                    .get("sale_id")
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                total: get("total"),
                available: get("available"),
                reserved: get("reserved"),
                sold: get("sold"),
                sold_out: get("sold_out") == 1,
            },
            closed: get("closed") == 1,
            per_user_limit: get("per_user_limit"),
            reservation_ttl_ms: get("ttl_ms"),
            starts_at_ms: get("starts_at_ms"),
            ends_at_ms: get("ends_at_ms"),
            overdue: get("overdue"),
            next_deadline_ms: num("next_deadline_ms"),
            overbook: fields
                .get("overbook")
                .and_then(|v| v.parse().ok())
                .unwrap_or(DEFAULT_OVERBOOK),
            queued: get("queued"),
            waiting: get("waiting"),
            holders: get("holders"),
            line_cap: get("line_cap"),
            line_full: get("line_full") == 1,
        })
    }
}

pub(crate) fn unexpected<T>(reply: &[String]) -> Result<T, StockError> {
    Err(StockError::UnexpectedReply(reply.to_vec()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenOutcome {
    Opened,
    /// This very sale was already open: a replayed create.
    Unchanged,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReserveOutcome {
    Reserved {
        expires_at_ms: u64,
        amount_cents: u64,
        sale_id: String,
    },
    Rejected {
        reason: String,
    },
    /// In the sku's line: units may still come back, none is free for it
    /// yet. Its final answer is announced by whichever call decides it.
    Waiting,
    /// Its buyer was answered with a failure before any shop-worker saw it
    /// (`void.lua`): not processed, and nothing to tell.
    Voided,
}

impl ReserveOutcome {
    /// A short name for metrics and logs: `reserved`, `waiting`, `voided`,
    /// or the reason of a rejection.
    pub fn label(&self) -> &str {
        match self {
            Self::Reserved { .. } => "reserved",
            Self::Rejected { reason } => reason,
            Self::Waiting => "waiting",
            Self::Voided => "voided",
        }
    }

    pub(crate) fn from_reply(sku: &Sku, reply: Vec<String>) -> Result<Self, StockError> {
        match reply.as_slice() {
            [kind] if kind == "waiting" => Ok(Self::Waiting),
            [kind] if kind == "voided" => Ok(Self::Voided),
            [kind, expires, amount, sale] if kind == "reserved" => {
                match (expires.parse(), amount.parse()) {
                    (Ok(expires_at_ms), Ok(amount_cents)) => Ok(Self::Reserved {
                        expires_at_ms,
                        amount_cents,
                        sale_id: sale.clone(),
                    }),
                    _ => unexpected(&reply),
                }
            }
            [kind, reason] if kind == "rejected" => Ok(Self::Rejected {
                reason: reason.clone(),
            }),
            [kind] if kind == "unloaded" => Err(StockError::Unloaded(sku.clone())),
            _ => unexpected(&reply),
        }
    }
}

/// A waiter whose answer a script decided: the caller publishes its
/// reservation or posts its rejection, then acknowledges (`StockStore::ack`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    pub id: RequestId,
    pub user: UserId,
    pub quantity: Quantity,
    /// `Reserved` or `Rejected`.
    pub outcome: ReserveOutcome,
}

pub(crate) fn announcements(
    sku: &Sku,
    reply: Vec<String>,
) -> Result<Vec<Announcement>, StockError> {
    reply
        .chunks(3)
        .map(|chunk| {
            let [id, who, answer] = chunk else {
                return unexpected(chunk);
            };
            let who = who.split_once(' ');
            let parsed = (
                RequestId::parse(id).ok(),
                who.and_then(|(user, _)| UserId::parse(user).ok()),
                who.and_then(|(_, qty)| qty.parse::<i64>().ok())
                    .and_then(|q| Quantity::new(q).ok()),
                serde_json::from_str::<Vec<String>>(answer).ok(),
            );
            match parsed {
                (Some(id), Some(user), Some(quantity), Some(answer)) => Ok(Announcement {
                    id,
                    user,
                    quantity,
                    outcome: ReserveOutcome::from_reply(sku, answer)?,
                }),
                _ => unexpected(chunk),
            }
        })
        .collect()
}

/// A script's own answer, and the waiters it decided on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answered<T> {
    pub outcome: T,
    pub line: Vec<Announcement>,
}

impl<T> Answered<T> {
    pub(crate) fn parse(
        sku: &Sku,
        (answer, line): (Vec<String>, Vec<String>),
        outcome: impl FnOnce(Vec<String>) -> Result<T, StockError>,
    ) -> Result<Self, StockError> {
        Ok(Self {
            outcome: outcome(answer)?,
            line: announcements(sku, line)?,
        })
    }
}

/// Where a waiting purchase stands in its sku's line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LinePlace {
    /// 1: the next unit that comes back is this buyer's.
    pub position: u64,
    /// Units held by buyers who have not paid yet: the only ones that can
    /// still come back.
    pub units_may_return: i64,
    /// When the last of those is decided at the latest (unix ms).
    pub decided_by_ms: Option<u64>,
}

/// What `admit.lua` decided about one purchase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// In the window: produce it now. `at_ms`: when, by the clock the
    /// admission used.
    Admitted {
        at_ms: u64,
    },
    /// Admitted earlier (the same request id) and not answered yet.
    Duplicate {
        admitted_at_ms: u64,
        /// Now, by the same clock.
        now_ms: u64,
    },
    /// A shop-worker already answered this request id.
    Processed(ReserveOutcome),
    /// Every unit is spoken for: `people` already hold, wait or are on
    /// their way, and at most `cap` may.
    Full {
        people: u64,
        cap: u64,
    },
    SoldOut,
    /// Closed or over (a buyer before the opening is let into the line).
    NotActive,
    /// Redis holds no stock for the sku.
    Unknown,
    /// The request id (buyer and Idempotency-Key) named a purchase of an
    /// earlier sale of the sku: the key was reused.
    Reused,
}

impl Admission {
    pub(crate) fn from_reply(sku: &Sku, reply: Vec<String>) -> Result<Self, StockError> {
        let number = |raw: &str| raw.parse::<f64>().ok().map(|n| n as u64);
        Ok(match reply.as_slice() {
            [kind, at] if kind == "admitted" => match number(at) {
                Some(at_ms) => Self::Admitted { at_ms },
                None => return unexpected(&reply),
            },
            [kind, at, now] if kind == "duplicate" => match (number(at), number(now)) {
                (Some(admitted_at_ms), Some(now_ms)) => Self::Duplicate {
                    admitted_at_ms,
                    now_ms,
                },
                _ => return unexpected(&reply),
            },
            [kind, answer] if kind == "processed" => {
                match serde_json::from_str::<Vec<String>>(answer) {
                    Ok(answer) => Self::Processed(ReserveOutcome::from_reply(sku, answer)?),
                    Err(_) => return unexpected(&reply),
                }
            }
            [kind, people, cap] if kind == "full" => match (number(people), number(cap)) {
                (Some(people), Some(cap)) => Self::Full { people, cap },
                _ => return unexpected(&reply),
            },
            [kind] if kind == "sold_out" => Self::SoldOut,
            [kind] if kind == "not_active" => Self::NotActive,
            [kind] if kind == "unknown" => Self::Unknown,
            [kind] if kind == "reused" => Self::Reused,
            _ => return unexpected(&reply),
        })
    }

    pub fn label(&self) -> &'static str {
        match self {
            Self::Admitted { .. } => "admitted",
            Self::Duplicate { .. } => "duplicate",
            Self::Processed(_) => "processed",
            Self::Full { .. } => "full",
            Self::SoldOut => "sold_out",
            Self::NotActive => "not_active",
            Self::Unknown => "unknown",
            Self::Reused => "reused",
        }
    }
}

/// A sku's flags as the gateways keep them in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SkuFlags {
    /// No unit is free (some may come back to the line).
    pub sold_out: bool,
    pub closed: bool,
    /// No room in the line: every unit is sold or spoken for.
    pub line_full: bool,
    /// When the sale ends (unix ms); 0 when not known.
    pub ends_at_ms: u64,
}

impl SkuFlags {
    /// Closed, or past its end: no purchase can be let in.
    pub fn over(&self, now_ms: u64) -> bool {
        self.closed || (self.ends_at_ms > 0 && now_ms >= self.ends_at_ms)
    }

    /// Parses a message of `FLAGS_CHANNEL`:
    /// "<sku> <sold_out> <closed> <line_full> <ends_at_ms>".
    pub fn from_message(message: &str) -> Option<(Sku, Self)> {
        let mut parts = message.split(' ');
        let sku = Sku::parse(parts.next()?).ok()?;
        let flag = |part: Option<&str>| match part {
            Some("1") => Some(true),
            Some("0") => Some(false),
            _ => None,
        };
        let flags = Self {
            sold_out: flag(parts.next())?,
            closed: flag(parts.next())?,
            line_full: flag(parts.next())?,
            ends_at_ms: parts.next()?.parse::<f64>().ok()? as u64,
        };
        parts.next().is_none().then_some((sku, flags))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    Committed,
    /// The deadline passed before payment finished: refund and cancel.
    Expired,
    /// The units were already given back, for this reason.
    Released {
        reason: String,
    },
    /// No record of this sale: its retention ended or the sale was replaced.
    Missing,
}

impl CommitOutcome {
    pub(crate) fn from_reply(sku: &Sku, reply: Vec<String>) -> Result<Self, StockError> {
        match reply.as_slice() {
            [kind] if kind == "committed" => Ok(Self::Committed),
            [kind] if kind == "expired" => Ok(Self::Expired),
            [kind, reason] if kind == "released" => Ok(Self::Released {
                reason: reason.clone(),
            }),
            [kind] if kind == "missing" => Ok(Self::Missing),
            [kind] if kind == "unloaded" => Err(StockError::Unloaded(sku.clone())),
            _ => unexpected(&reply),
        }
    }
}

/// What became of a reservation a saga withdrew before cancelling its
/// order (`withdraw.lua`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WithdrawOutcome {
    /// Never to be sold now (withdrawn, or already given back), for the
    /// reason of whichever came first: the order may be cancelled.
    Withdrawn {
        reason: String,
    },
    /// Sold: paid for by another run of the same purchase, whose order is
    /// to be confirmed.
    WasCommitted,
    Missing,
}

impl WithdrawOutcome {
    pub(crate) fn from_reply(sku: &Sku, reply: Vec<String>) -> Result<Self, StockError> {
        match reply.as_slice() {
            [kind, reason] if kind == "withdrawn" || kind == "released" => Ok(Self::Withdrawn {
                reason: reason.clone(),
            }),
            [kind] if kind == "committed" => Ok(Self::WasCommitted),
            [kind] if kind == "missing" => Ok(Self::Missing),
            [kind] if kind == "unloaded" => Err(StockError::Unloaded(sku.clone())),
            _ => unexpected(&reply),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// The units are back in stock: released for `reason` by whichever
    /// release came first (this one, an earlier delivery, or the sweep).
    Released {
        reason: String,
    },
    /// Sold units are never given back.
    WasCommitted,
    Missing,
}

impl ReleaseOutcome {
    pub(crate) fn from_reply(sku: &Sku, reply: Vec<String>) -> Result<Self, StockError> {
        match reply.as_slice() {
            [kind, reason] if kind == "released" => Ok(Self::Released {
                reason: reason.clone(),
            }),
            [kind] if kind == "committed" => Ok(Self::WasCommitted),
            [kind] if kind == "missing" => Ok(Self::Missing),
            [kind] if kind == "unloaded" => Err(StockError::Unloaded(sku.clone())),
            _ => unexpected(&reply),
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            Self::Released { .. } => "released",
            Self::WasCommitted => "was_committed",
            Self::Missing => "missing",
        }
    }
}

/// A reservation the sweep gave back because its deadline passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    pub id: RequestId,
    pub user: UserId,
    pub quantity: Quantity,
}

pub(crate) fn expired_from_reply(reply: Vec<String>) -> Result<Vec<Expired>, StockError> {
    reply
        .chunks(3)
        .map(|chunk| match chunk {
            [id, user, qty] => {
                let parsed = (
                    RequestId::parse(id),
                    UserId::parse(user),
                    qty.parse::<i64>().ok().and_then(|q| Quantity::new(q).ok()),
                );
                match parsed {
                    (Ok(id), Ok(user), Some(quantity)) => Ok(Expired { id, user, quantity }),
                    _ => unexpected(chunk),
                }
            }
            _ => unexpected(chunk),
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Restocked {
    pub total: i64,
    pub available: i64,
}

/// The state of one reservation as recovery found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoredState {
    Reserved,
    Committed,
    Released { reason: String },
}

/// A reservation to write back after Redis was lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredReservation {
    pub id: RequestId,
    pub user: UserId,
    pub quantity: Quantity,
    pub amount_cents: u64,
    pub expires_at_ms: u64,
    pub state: RestoredState,
}
