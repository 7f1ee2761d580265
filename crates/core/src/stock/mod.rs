//! The stock of each sku in Redis, changed only through the Lua scripts.
//!
//! Every key of one sku carries the hash tag `{sku}` so a script touches a
//! single Redis Cluster slot. Scripts are atomic and idempotent per request
//! id, and take `now` from the caller, so replaying a Kafka message (or
//! racing two workers on one) never moves a unit twice.

pub mod herald;

use std::collections::HashMap;

use redis::AsyncCommands;
use serde::Serialize;

use crate::bus::messages::PurchaseRequest;
use crate::ids::{Quantity, RequestId, Sku, UserId};
use crate::service::redis_conn::{self, RedisConn};
use crate::service::settings::RedisSettings;

macro_rules! script {
    ($name:ident, $file:literal) => {
        static $name: std::sync::LazyLock<redis::Script> =
            std::sync::LazyLock::new(|| redis::Script::new(include_str!($file)));
    };
    // A script that shares helpers with others gets them prepended: the
    // ones that publish a flip of a sku's flags (see `FLAGS_CHANNEL`), and
    // the line's (`lua/line.lua`), which need the former.
    ($name:ident, $file:literal, with flags) => {
        static $name: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(concat!(include_str!("lua/flags.lua"), include_str!($file)))
        });
    };
    ($name:ident, $file:literal, with line) => {
        static $name: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(concat!(
                include_str!("lua/flags.lua"),
                include_str!("lua/line.lua"),
                include_str!($file)
            ))
        });
    };
}
script!(OPEN, "lua/open.lua", with line);
script!(RESERVE, "lua/reserve.lua", with line);
script!(COMMIT, "lua/commit.lua", with line);
script!(RELEASE, "lua/release.lua", with line);
script!(EXPIRE, "lua/expire.lua", with line);
script!(RESTOCK, "lua/restock.lua", with line);
script!(CLOSE, "lua/close.lua", with flags);
script!(STATUS, "lua/status.lua", with line);
script!(ADMIT, "lua/admit.lua", with line);
script!(SERVE, "lua/serve.lua", with line);
script!(LINE_PLACE, "lua/line_place.lua", with line);
script!(WITHDRAW, "lua/withdraw.lua");
script!(VOID, "lua/void.lua", with line);

/// Where the scripts publish "<sku> <sold_out> <closed> <line_full>
/// <ends_at_ms>" (flags `0` or `1`) whenever one of a sku's flags changes
/// (`lua/flags.lua`).
/// Outside any hash tag: Redis Cluster forwards a publish to every node.
pub const FLAGS_CHANNEL: &str = "fs:sku-flags";

/// Where `admit.lua` publishes "<sku> <request id>" for every purchase it
/// lets in, and `open.lua` "<sku> *" when a new sale starts afresh: what
/// lets a gateway answer a repeated POST for a full sku from memory.
pub const ADMITTED_CHANNEL: &str = "fs:admitted";

/// Buyers per unit not yet sold who may hold or wait for one, when the
/// sale does not say.
pub const DEFAULT_OVERBOOK: f64 = 1.5;

/// Waiters one script serves or turns away at most; the sweep goes on with
/// the rest.
pub const SERVE_LIMIT: usize = 256;

/// How long a sweep remembers what it released, for a retry after a lost
/// reply; sweeps are retried within seconds.
const SWEEP_MARKER_MS: u64 = 10 * 60 * 1000;

#[derive(Debug, thiserror::Error)]
pub enum StockError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("a stock script answered something unexpected: {0:?}")]
    UnexpectedReply(Vec<String>),
    /// The sku has a sale but Redis holds no stock for it: Redis was lost.
    /// Scripts change nothing until `flashsale recover --sku` rebuilt it.
    #[error("Redis holds no stock for {0}: run `flashsale recover --sku {0}`")]
    Unloaded(Sku),
}

impl StockError {
    /// Worth retrying: the connection dropped, Redis is restarting, or the
    /// sku waits for its recovery.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Redis(e) => redis_is_transient(e),
            Self::UnexpectedReply(_) => false,
            Self::Unloaded(_) => true,
        }
    }
}

/// Worth retrying: the connection dropped or Redis is restarting.
pub fn redis_is_transient(e: &redis::RedisError) -> bool {
    // Out of memory under `noeviction`, a replica during a failover, a
    // node still loading: conditions that pass, not wrong commands.
    matches!(
        e.code(),
        Some("OOM" | "READONLY" | "LOADING" | "MASTERDOWN")
    ) || e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(
            e.kind(),
            redis::ErrorKind::BusyLoadingError
                | redis::ErrorKind::TryAgain
                | redis::ErrorKind::ClusterDown
                | redis::ErrorKind::MasterDown
        )
}

/// The keys of one sku. `{sku}` is the Redis Cluster hash tag.
#[derive(Debug)]
pub struct SkuKeys(String);

impl SkuKeys {
    pub fn new(sku: &Sku) -> Self {
        Self(format!("fs:{{{sku}}}"))
    }
    pub fn stock(&self) -> String {
        format!("{}:stock", self.0)
    }
    pub fn users(&self) -> String {
        format!("{}:users", self.0)
    }
    /// Sorted set of reserved request ids, scored by deadline.
    pub fn deadlines(&self) -> String {
        format!("{}:deadlines", self.0)
    }
    pub fn processed(&self, id: RequestId) -> String {
        format!("{}:req:{id}", self.0)
    }
    pub fn reservation_prefix(&self) -> String {
        format!("{}:res:", self.0)
    }
    pub fn reservation(&self, id: RequestId) -> String {
        format!("{}{id}", self.reservation_prefix())
    }
    pub fn sweep(&self, sweep_id: &str) -> String {
        format!("{}:sweep:{sweep_id}", self.0)
    }
    pub fn restock(&self, operation_id: &str) -> String {
        format!("{}:restock:{operation_id}", self.0)
    }
    /// Sorted set of request ids the gateways let into the queue and no
    /// shop-worker has answered yet, scored by when (`admit.lua`).
    pub fn admitted(&self) -> String {
        format!("{}:admitted", self.0)
    }
    /// Every request id admitted in this sale (`lua/line.lua` derives the
    /// line's keys from the stock hash's name the same way).
    pub fn admitted_ever(&self) -> String {
        format!("{}:admitted:ever", self.0)
    }
    /// Sorted set of the request ids waiting in the sku's line, by place.
    pub fn line(&self) -> String {
        format!("{}:line", self.0)
    }
    /// Request id -> "<user> <quantity>" of a waiter, until announced.
    pub fn line_who(&self) -> String {
        format!("{}:line:who", self.0)
    }
    /// Request id -> when its buyer last asked for it (ms).
    pub fn line_seen(&self) -> String {
        format!("{}:line:seen", self.0)
    }
    /// Decided waiters still to be announced, by when the sweep should.
    pub fn line_out(&self) -> String {
        format!("{}:line:out", self.0)
    }
}

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
    fn from_reply(reply: Vec<String>) -> Option<Self> {
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

fn unexpected<T>(reply: &[String]) -> Result<T, StockError> {
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

    fn from_reply(sku: &Sku, reply: Vec<String>) -> Result<Self, StockError> {
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

fn announcements(sku: &Sku, reply: Vec<String>) -> Result<Vec<Announcement>, StockError> {
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
    fn parse(
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
    fn from_reply(sku: &Sku, reply: Vec<String>) -> Result<Self, StockError> {
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
    fn from_reply(sku: &Sku, reply: Vec<String>) -> Result<Self, StockError> {
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
    fn from_reply(sku: &Sku, reply: Vec<String>) -> Result<Self, StockError> {
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
    fn from_reply(sku: &Sku, reply: Vec<String>) -> Result<Self, StockError> {
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

fn expired_from_reply(reply: Vec<String>) -> Result<Vec<Expired>, StockError> {
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

/// Opens a connection as the settings say (single Redis or cluster).
pub async fn connect(settings: &RedisSettings) -> Result<RedisConn, StockError> {
    Ok(redis_conn::connect(settings).await?)
}

#[derive(Debug, Clone)]
pub struct StockStore {
    conn: RedisConn,
    retention_ms: u64,
    /// The set of skus with a sale: what the sweep walks
    /// (`RedisSettings::sales_key`). Outside any sku's hash tag, and written
    /// only by plain `SADD`, never by a script.
    sales_key: String,
}

impl StockStore {
    /// The connection the store uses, for what shares its Redis.
    pub fn connection(&self) -> &RedisConn {
        &self.conn
    }
}

impl StockStore {
    pub fn new(conn: RedisConn, settings: &RedisSettings) -> Self {
        Self {
            conn,
            retention_ms: settings.retention.as_millis() as u64,
            sales_key: settings.sales_key.clone(),
        }
    }

    /// Whether Redis answers: the readiness probe.
    pub async fn ping(&self) -> Result<(), StockError> {
        redis::cmd("PING")
            .query_async::<String>(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Opens a fresh sale of `sku`, replacing whatever Redis held for it.
    pub async fn open_sale(&self, sku: &Sku, rules: &SaleRules) -> Result<OpenOutcome, StockError> {
        let mut conn = self.conn.clone();
        // Registered first: a sku in the registry without stock is skipped
        // by the sweep, while stock without registration would never expire.
        conn.sadd::<_, _, ()>(&self.sales_key, sku.as_str()).await?;
        let keys = SkuKeys::new(sku);
        let reply: Vec<String> = OPEN
            .key(keys.stock())
            .key(keys.users())
            .key(keys.deadlines())
            .arg(&rules.sale_id)
            .arg(rules.total)
            .arg(rules.per_user_limit)
            .arg(rules.price_cents)
            .arg(rules.reservation_ttl_ms)
            .arg(rules.starts_at_ms)
            .arg(rules.ends_at_ms)
            .arg(rules.overbook)
            // The draw among early buyers is fair only if nobody can
            // compute tickets: a random salt, never shown.
            .arg(uuid::Uuid::new_v4().simple().to_string())
            .arg(self.retention_ms)
            .invoke_async(&mut conn)
            .await?;
        match reply.first().map(String::as_str) {
            Some("opened") => Ok(OpenOutcome::Opened),
            Some("unchanged") => Ok(OpenOutcome::Unchanged),
            _ => unexpected(&reply),
        }
    }

    /// Every sku that has had a sale here: what the sweep walks.
    pub async fn sale_skus(&self) -> Result<Vec<Sku>, StockError> {
        let raw: Vec<String> = self.conn.clone().smembers(&self.sales_key).await?;
        Ok(raw.iter().filter_map(|s| Sku::parse(s).ok()).collect())
    }

    pub async fn status(&self, sku: &Sku, now_ms: u64) -> Result<Option<SkuStatus>, StockError> {
        let keys = SkuKeys::new(sku);
        let reply: Vec<String> = STATUS
            .key(keys.stock())
            .key(keys.deadlines())
            .key(keys.admitted())
            .arg(now_ms)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(SkuStatus::from_reply(reply))
    }

    pub async fn levels(&self, sku: &Sku) -> Result<Option<StockLevels>, StockError> {
        Ok(self
            .status(sku, crate::clock::now_ms())
            .await?
            .map(|status| status.levels))
    }

    /// The sku's flags, `None` when Redis holds no stock for it: what a
    /// gateway rereads when it may have missed a published change.
    pub async fn flags(&self, sku: &Sku) -> Result<Option<SkuFlags>, StockError> {
        let mut conn = self.conn.clone();
        let read: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(SkuKeys::new(sku).stock())
            .arg(&["total", "sold_out", "closed", "line_full", "ends_at_ms"])
            .query_async(&mut conn)
            .await?;
        let field = |i: usize| read.get(i).and_then(|v| v.as_deref());
        let set = |i: usize| field(i) == Some("1");
        Ok(field(0).map(|_| SkuFlags {
            sold_out: set(1),
            closed: set(2),
            line_full: set(3),
            ends_at_ms: field(4).and_then(|v| v.parse().ok()).unwrap_or(0),
        }))
    }

    /// Every request id the gateways admitted in the sku's current sale.
    pub async fn admitted_ever(&self, sku: &Sku) -> Result<Vec<RequestId>, StockError> {
        let raw: Vec<String> = self
            .conn
            .clone()
            .smembers(SkuKeys::new(sku).admitted_ever())
            .await?;
        Ok(raw
            .iter()
            .filter_map(|id| RequestId::parse(id).ok())
            .collect())
    }

    /// Lets request `id` into the sku's line if there is room
    /// (`admit.lua`). `lease_ms`: how long an admitted request may stay
    /// unseen by a shop-worker before the line forgets it. `now_ms`: `None`
    /// for Redis's own clock (what gateways use: theirs may disagree).
    pub async fn admit(
        &self,
        sku: &Sku,
        id: RequestId,
        now_ms: Option<u64>,
        lease_ms: u64,
    ) -> Result<Admission, StockError> {
        let keys = SkuKeys::new(sku);
        let reply: Vec<String> = ADMIT
            .key(keys.stock())
            .key(keys.admitted())
            .key(keys.processed(id))
            .arg(id.to_string())
            .arg(now_ms.map(|n| n.to_string()).unwrap_or_default())
            .arg(lease_ms)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Admission::from_reply(sku, reply)
    }

    /// Makes sure purchase `id`, whose buyer is to be answered with a
    /// failure, is never processed later (`void.lua`), unless a
    /// shop-worker answered it already: `Ok(None)` when voided, else its
    /// answer.
    pub async fn void(
        &self,
        sku: &Sku,
        id: RequestId,
        now_ms: u64,
    ) -> Result<Option<ReserveOutcome>, StockError> {
        let keys = SkuKeys::new(sku);
        let reply: Vec<String> = VOID
            .key(keys.stock())
            .key(keys.processed(id))
            .arg(id.to_string())
            .arg(now_ms)
            .arg(self.retention_ms)
            .invoke_async(&mut self.conn.clone())
            .await?;
        match reply.as_slice() {
            [kind] if kind == "voided" => Ok(None),
            [kind, answer] if kind == "processed" => {
                match serde_json::from_str::<Vec<String>>(answer) {
                    Ok(answer) => Ok(Some(ReserveOutcome::from_reply(sku, answer)?)),
                    Err(_) => unexpected(&reply),
                }
            }
            _ => unexpected(&reply),
        }
    }

    /// Gives back the place of an admitted request that never reached
    /// Kafka (the produce failed).
    pub async fn unadmit(&self, sku: &Sku, id: RequestId) -> Result<(), StockError> {
        self.conn
            .clone()
            .zrem::<_, _, ()>(SkuKeys::new(sku).admitted(), id.to_string())
            .await?;
        Ok(())
    }

    /// The keys and arguments of `reserve.lua` for one request.
    fn reserve_call(
        &self,
        request: &PurchaseRequest,
        now_ms: u64,
        max_queue_age_ms: u64,
    ) -> ([String; 6], [String; 8]) {
        let keys = SkuKeys::new(&request.sku);
        let id = request.request_id;
        (
            [
                keys.stock(),
                keys.users(),
                keys.processed(id),
                keys.reservation(id),
                keys.deadlines(),
                keys.admitted(),
            ],
            [
                id.to_string(),
                request.user_id.to_string(),
                request.quantity.get().to_string(),
                now_ms.to_string(),
                request.accepted_at_ms.to_string(),
                max_queue_age_ms.to_string(),
                self.retention_ms.to_string(),
                SERVE_LIMIT.to_string(),
            ],
        )
    }

    pub async fn reserve(
        &self,
        request: &PurchaseRequest,
        now_ms: u64,
        max_queue_age_ms: u64,
    ) -> Result<Answered<ReserveOutcome>, StockError> {
        let (keys, args) = self.reserve_call(request, now_ms, max_queue_age_ms);
        let reply = RESERVE
            .key(&keys)
            .arg(&args)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Answered::parse(&request.sku, reply, |answer| {
            ReserveOutcome::from_reply(&request.sku, answer)
        })
    }

    /// Reserves many requests in one round trip (`EVALSHA`s in a pipeline,
    /// the script loaded first). Each is still its own atomic script, run in
    /// order; on a cluster, all requests must be of one sku.
    pub async fn reserve_pipelined(
        &self,
        requests: &[PurchaseRequest],
        now_ms: u64,
        max_queue_age_ms: u64,
    ) -> Result<Vec<Result<Answered<ReserveOutcome>, StockError>>, StockError> {
        let mut conn = self.conn.clone();
        RESERVE.prepare_invoke().load_async(&mut conn).await?;
        let mut pipe = redis::pipe();
        for request in requests {
            let (keys, args) = self.reserve_call(request, now_ms, max_queue_age_ms);
            pipe.cmd("EVALSHA")
                .arg(RESERVE.get_hash())
                .arg(keys.len())
                .arg(&keys)
                .arg(&args);
        }
        let replies: Vec<(Vec<String>, Vec<String>)> = pipe.query_async(&mut conn).await?;
        Ok(requests
            .iter()
            .zip(replies)
            .map(|(request, reply)| {
                Answered::parse(&request.sku, reply, |answer| {
                    ReserveOutcome::from_reply(&request.sku, answer)
                })
            })
            .collect())
    }

    pub async fn commit(
        &self,
        sku: &Sku,
        id: RequestId,
        now_ms: u64,
    ) -> Result<Answered<CommitOutcome>, StockError> {
        let keys = SkuKeys::new(sku);
        let reply = COMMIT
            .key(keys.stock())
            .key(keys.deadlines())
            .key(keys.reservation(id))
            .arg(id.to_string())
            .arg(now_ms)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Answered::parse(sku, reply, |answer| CommitOutcome::from_reply(sku, answer))
    }

    /// Settles reservation `id` as never to be sold, unless it was sold
    /// already (`withdraw.lua`).
    pub async fn withdraw(
        &self,
        sku: &Sku,
        id: RequestId,
        reason: &str,
    ) -> Result<WithdrawOutcome, StockError> {
        let keys = SkuKeys::new(sku);
        let reply: Vec<String> = WITHDRAW
            .key(keys.stock())
            .key(keys.reservation(id))
            .arg(reason)
            .invoke_async(&mut self.conn.clone())
            .await?;
        WithdrawOutcome::from_reply(sku, reply)
    }

    pub async fn release(
        &self,
        sku: &Sku,
        id: RequestId,
        reason: &str,
        now_ms: u64,
    ) -> Result<Answered<ReleaseOutcome>, StockError> {
        let keys = SkuKeys::new(sku);
        let reply = RELEASE
            .key(keys.stock())
            .key(keys.users())
            .key(keys.deadlines())
            .key(keys.reservation(id))
            .arg(id.to_string())
            .arg(reason)
            .arg(now_ms)
            .arg(SERVE_LIMIT)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Answered::parse(sku, reply, |answer| ReleaseOutcome::from_reply(sku, answer))
    }

    /// Releases up to `limit` reservations whose deadline is before `now`.
    /// Retry a failed call with the same `sweep_id`: a sweep whose reply was
    /// lost answers the same list again.
    pub async fn expire(
        &self,
        sku: &Sku,
        sweep_id: &str,
        now_ms: u64,
        limit: usize,
    ) -> Result<Answered<Vec<Expired>>, StockError> {
        let keys = SkuKeys::new(sku);
        let reply = EXPIRE
            .key(keys.stock())
            .key(keys.users())
            .key(keys.deadlines())
            .key(keys.sweep(sweep_id))
            .arg(now_ms)
            .arg(limit)
            .arg(keys.reservation_prefix())
            .arg(SWEEP_MARKER_MS)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Answered::parse(sku, reply, expired_from_reply)
    }

    /// The sweep's round over the sku's line (`serve.lua`): turns away
    /// waiters whose buyer has not asked for `patience_ms`, serves the
    /// head, trims the tail, and returns what is to be announced.
    pub async fn serve(
        &self,
        sku: &Sku,
        now_ms: u64,
        patience_ms: u64,
        limit: usize,
    ) -> Result<Vec<Announcement>, StockError> {
        let reply: Vec<String> = SERVE
            .key(SkuKeys::new(sku).stock())
            .arg(now_ms)
            .arg(patience_ms)
            .arg(limit.max(1))
            .invoke_async(&mut self.conn.clone())
            .await?;
        announcements(sku, reply)
    }

    /// Marks announced waiters done, so the sweep does not announce them
    /// again.
    pub async fn ack(&self, sku: &Sku, ids: &[RequestId]) -> Result<(), StockError> {
        if ids.is_empty() {
            return Ok(());
        }
        let keys = SkuKeys::new(sku);
        let ids: Vec<String> = ids.iter().map(RequestId::to_string).collect();
        redis::pipe()
            .zrem(keys.line_out(), &ids)
            .ignore()
            .hdel(keys.line_who(), &ids)
            .ignore()
            .query_async::<()>(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Where purchase `id` stands in the sku's line, `None` when it is not
    /// in it. Asking keeps its place (`line_place.lua`).
    pub async fn line_place(
        &self,
        sku: &Sku,
        id: RequestId,
        now_ms: u64,
    ) -> Result<Option<LinePlace>, StockError> {
        let reply: Vec<String> = LINE_PLACE
            .key(SkuKeys::new(sku).stock())
            .arg(id.to_string())
            .arg(now_ms)
            .invoke_async(&mut self.conn.clone())
            .await?;
        match reply.as_slice() {
            [] => Ok(None),
            [position, units, last] => match (position.parse(), units.parse()) {
                (Ok(position), Ok(units_may_return)) => Ok(Some(LinePlace {
                    position,
                    units_may_return,
                    decided_by_ms: last.parse::<f64>().ok().map(|ms| ms as u64),
                })),
                _ => unexpected(&reply),
            },
            _ => unexpected(&reply),
        }
    }

    /// Adds `units`; replaying `operation_id` answers the first result.
    pub async fn restock(
        &self,
        sku: &Sku,
        operation_id: &str,
        units: u64,
        now_ms: u64,
    ) -> Result<Restocked, StockError> {
        let keys = SkuKeys::new(sku);
        let reply: Vec<String> = RESTOCK
            .key(keys.stock())
            .key(keys.restock(operation_id))
            .arg(units)
            .arg(self.retention_ms)
            .arg(now_ms)
            .arg(SERVE_LIMIT)
            .invoke_async(&mut self.conn.clone())
            .await?;
        match reply.as_slice() {
            [kind, total, available] if kind == "restocked" => {
                match (total.parse(), available.parse()) {
                    (Ok(total), Ok(available)) => Ok(Restocked { total, available }),
                    _ => unexpected(&reply),
                }
            }
            [kind] if kind == "unloaded" => Err(StockError::Unloaded(sku.clone())),
            _ => unexpected(&reply),
        }
    }

    pub async fn close(&self, sku: &Sku) -> Result<(), StockError> {
        let reply: Vec<String> = CLOSE
            .key(SkuKeys::new(sku).stock())
            .invoke_async(&mut self.conn.clone())
            .await?;
        match reply.first().map(String::as_str) {
            Some("closed") => Ok(()),
            Some("unloaded") => Err(StockError::Unloaded(sku.clone())),
            _ => unexpected(&reply),
        }
    }

    /// Forgets the sku's stock: every script then answers `unloaded` and
    /// waits, as after a lost Redis. Recovery starts with this.
    pub async fn unload(&self, sku: &Sku) -> Result<(), StockError> {
        let keys = SkuKeys::new(sku);
        let mut conn = self.conn.clone();
        conn.del::<_, ()>(keys.stock()).await?;
        conn.del::<_, ()>(&[keys.users(), keys.deadlines()]).await?;
        Ok(())
    }

    /// Writes back a sku's state after Redis was lost: reservation records,
    /// processed markers (so a redelivered request is not reserved again),
    /// per-user counts and deadlines first, and the stock hash last, which
    /// is what makes the sku usable again. Call `unload` first.
    pub async fn restore(
        &self,
        sku: &Sku,
        rules: &SaleRules,
        closed: bool,
        reservations: &[RestoredReservation],
    ) -> Result<StockLevels, StockError> {
        let keys = SkuKeys::new(sku);
        let mut conn = self.conn.clone();
        let mut users: HashMap<&str, i64> = HashMap::new();
        let (mut reserved, mut sold) = (0i64, 0i64);
        let record_life = rules.reservation_ttl_ms + self.retention_ms;
        for chunk in reservations.chunks(500) {
            let mut pipe = redis::pipe();
            for r in chunk {
                let qty = i64::from(r.quantity.get());
                let (state, reason) = match &r.state {
                    RestoredState::Reserved => ("reserved", ""),
                    RestoredState::Committed => ("committed", ""),
                    RestoredState::Released { reason } => ("released", reason.as_str()),
                };
                match r.state {
                    RestoredState::Reserved => {
                        reserved += qty;
                        pipe.zadd(keys.deadlines(), r.id.to_string(), r.expires_at_ms)
                            .ignore();
                    }
                    RestoredState::Committed => sold += qty,
                    RestoredState::Released { .. } => {}
                }
                if !matches!(r.state, RestoredState::Released { .. }) {
                    *users.entry(r.user.as_str()).or_default() += qty;
                }
                let record = keys.reservation(r.id);
                pipe.hset_multiple(
                    &record,
                    &[
                        ("user", r.user.to_string()),
                        ("quantity", qty.to_string()),
                        ("expires_at_ms", r.expires_at_ms.to_string()),
                        ("state", state.to_owned()),
                        ("sale_id", rules.sale_id.clone()),
                        ("reason", reason.to_owned()),
                    ],
                )
                .ignore();
                pipe.pexpire(&record, record_life as i64).ignore();
                let answer = serde_json::json!([
                    "reserved",
                    r.expires_at_ms.to_string(),
                    r.amount_cents.to_string(),
                    rules.sale_id
                ]);
                pipe.pset_ex(keys.processed(r.id), answer.to_string(), self.retention_ms)
                    .ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
        }
        if !users.is_empty() {
            let held: Vec<(&str, i64)> = users.into_iter().collect();
            conn.hset_multiple::<_, _, _, ()>(keys.users(), &held)
                .await?;
        }
        let total = rules.total as i64;
        let available = total - reserved - sold;
        let levels = StockLevels {
            sale_id: rules.sale_id.clone(),
            total,
            available,
            reserved,
            sold,
            sold_out: available <= 0,
        };
        // The line is not restored (it lived only in Redis): the holders
        // alone decide whether there is room.
        let cap = ((available + reserved).max(0) as f64 * rules.overbook - 1e-9).ceil() as i64;
        let holders = reservations
            .iter()
            .filter(|r| r.state == RestoredState::Reserved)
            .count() as i64;
        let line_full = holders >= cap;
        conn.hset_multiple::<_, _, _, ()>(
            keys.stock(),
            &[
                ("sale_id", rules.sale_id.clone()),
                ("total", total.to_string()),
                ("available", available.to_string()),
                ("reserved", reserved.to_string()),
                ("sold", sold.to_string()),
                ("per_user_limit", rules.per_user_limit.to_string()),
                ("price_cents", rules.price_cents.to_string()),
                ("ttl_ms", rules.reservation_ttl_ms.to_string()),
                ("starts_at_ms", rules.starts_at_ms.to_string()),
                ("ends_at_ms", rules.ends_at_ms.to_string()),
                ("overbook", rules.overbook.to_string()),
                ("retention_ms", self.retention_ms.to_string()),
                ("sold_out", if levels.sold_out { "1" } else { "0" }.into()),
                ("closed", if closed { "1" } else { "0" }.into()),
                ("line_full", if line_full { "1" } else { "0" }.into()),
            ],
        )
        .await?;
        // Gateways that still remember the sku learn its flags now.
        let flags = format!(
            "{sku} {} {} {} {}",
            u8::from(levels.sold_out),
            u8::from(closed),
            u8::from(line_full),
            rules.ends_at_ms
        );
        conn.publish::<_, _, ()>(FLAGS_CHANNEL, flags).await?;
        conn.sadd::<_, _, ()>(&self.sales_key, sku.as_str()).await?;
        Ok(levels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn sku() -> Sku {
        Sku::parse("tv-1").unwrap()
    }

    #[test]
    fn reserve_replies() {
        assert_eq!(
            ReserveOutcome::from_reply(&sku(), strings(&["reserved", "10", "500", "s1"])).unwrap(),
            ReserveOutcome::Reserved {
                expires_at_ms: 10,
                amount_cents: 500,
                sale_id: "s1".into()
            }
        );
        assert_eq!(
            ReserveOutcome::from_reply(&sku(), strings(&["rejected", "sold_out"])).unwrap(),
            ReserveOutcome::Rejected {
                reason: "sold_out".into()
            }
        );
        assert!(matches!(
            ReserveOutcome::from_reply(&sku(), strings(&["unloaded"])),
            Err(StockError::Unloaded(_))
        ));
        for bad in [
            strings(&[]),
            strings(&["reserved", "x", "1", "s"]),
            strings(&["maybe", "x"]),
        ] {
            assert!(ReserveOutcome::from_reply(&sku(), bad).is_err());
        }
    }

    #[test]
    fn commit_and_release_replies() {
        let commit = |v: &[&str]| CommitOutcome::from_reply(&sku(), strings(v));
        assert_eq!(commit(&["committed"]).unwrap(), CommitOutcome::Committed);
        assert_eq!(commit(&["expired"]).unwrap(), CommitOutcome::Expired);
        assert_eq!(commit(&["missing"]).unwrap(), CommitOutcome::Missing);
        assert_eq!(
            commit(&["released", "reservation_expired"]).unwrap(),
            CommitOutcome::Released {
                reason: "reservation_expired".into()
            }
        );
        assert!(commit(&["?"]).is_err());
        let unloaded = commit(&["unloaded"]).unwrap_err();
        assert!(unloaded.is_transient(), "{unloaded}");
        let release = |v: &[&str]| ReleaseOutcome::from_reply(&sku(), strings(v));
        assert_eq!(
            release(&["released", "payment_declined"]).unwrap(),
            ReleaseOutcome::Released {
                reason: "payment_declined".into()
            }
        );
        assert_eq!(
            release(&["committed"]).unwrap(),
            ReleaseOutcome::WasCommitted
        );
        assert!(release(&["released"]).is_err());
    }

    #[test]
    fn flag_messages() {
        let (sku, flags) = SkuFlags::from_message("tv-1 1 0 1 1700").unwrap();
        assert_eq!(sku.as_str(), "tv-1");
        assert_eq!(
            flags,
            SkuFlags {
                sold_out: true,
                closed: false,
                line_full: true,
                ends_at_ms: 1700
            }
        );
        assert!(!flags.over(1699) && flags.over(1700));
        for bad in [
            "tv-1 1 0 1",
            "tv-1 1 0 2 5",
            "tv-1 1 0 1 5 6",
            "tv-1 1 0 1 x",
        ] {
            assert!(SkuFlags::from_message(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn expired_replies() {
        let id = RequestId::fresh();
        let list = expired_from_reply(strings(&[&id.to_string(), "u1", "2"])).unwrap();
        assert_eq!(
            list,
            vec![Expired {
                id,
                user: UserId::parse("u1").unwrap(),
                quantity: Quantity::new(2).unwrap()
            }]
        );
        assert!(expired_from_reply(strings(&[&id.to_string(), "u1"])).is_err());
        assert!(expired_from_reply(strings(&["nope", "u1", "1"])).is_err());
        assert!(expired_from_reply(Vec::new()).unwrap().is_empty());
    }

    #[test]
    fn every_key_of_a_sku_shares_its_hash_tag() {
        let keys = SkuKeys::new(&sku());
        let id = RequestId::fresh();
        for key in [
            keys.stock(),
            keys.users(),
            keys.deadlines(),
            keys.processed(id),
            keys.reservation(id),
            keys.sweep("s"),
            keys.restock("r"),
        ] {
            assert!(key.starts_with("fs:{tv-1}:"), "{key}");
        }
    }
}
