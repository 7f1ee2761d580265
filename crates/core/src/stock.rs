//! The stock of each sku in Redis, changed only through the Lua scripts.
//!
//! Every key of one sku carries the hash tag `{sku}` so a script touches a
//! single Redis Cluster slot. Scripts are atomic and idempotent per request
//! id, and take `now` from the caller, so replaying a Kafka message (or
//! racing two workers on one) never moves a unit twice.

use std::collections::HashMap;

use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::Serialize;

use crate::ids::{RequestId, Sku};
use crate::messages::PurchaseRequest;
use crate::settings::RedisSettings;

static RESERVE: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("lua/reserve.lua")));
static COMMIT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("lua/commit.lua")));
static RELEASE: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("lua/release.lua")));

#[derive(Debug, thiserror::Error)]
pub enum StockError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("a stock script answered something unexpected: {0:?}")]
    UnexpectedReply(Vec<String>),
}

impl StockError {
    /// Worth retrying: the connection dropped or Redis is restarting.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Redis(e) => redis_is_transient(e),
            Self::UnexpectedReply(_) => false,
        }
    }
}

/// Worth retrying: the connection dropped or Redis is restarting.
pub fn redis_is_transient(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(
            e.kind(),
            redis::ErrorKind::BusyLoadingError | redis::ErrorKind::TryAgain
        )
}

/// The keys of one sku. `{sku}` is the Redis Cluster hash tag.
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
    pub fn processed(&self, id: RequestId) -> String {
        format!("{}:req:{id}", self.0)
    }
    pub fn reservation(&self, id: RequestId) -> String {
        format!("{}:res:{id}", self.0)
    }
    /// Matches every key of the sku, for a reset.
    pub fn pattern(&self) -> String {
        format!("{}:*", self.0)
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
}

impl ReserveOutcome {
    pub fn from_reply(reply: Vec<String>) -> Result<Self, StockError> {
        match reply.as_slice() {
            [kind, expires, amount, sale] if kind == "reserved" => {
                match (expires.parse(), amount.parse()) {
                    (Ok(expires_at_ms), Ok(amount_cents)) => Ok(Self::Reserved {
                        expires_at_ms,
                        amount_cents,
                        sale_id: sale.clone(),
                    }),
                    _ => Err(StockError::UnexpectedReply(reply)),
                }
            }
            [kind, reason] if kind == "rejected" => Ok(Self::Rejected {
                reason: reason.clone(),
            }),
            _ => Err(StockError::UnexpectedReply(reply)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    Committed,
    /// The deadline passed before payment finished: refund and cancel.
    Expired,
    /// The units were already given back (or the sale was reset).
    Gone,
}

impl CommitOutcome {
    pub fn from_reply(reply: String) -> Result<Self, StockError> {
        match reply.as_str() {
            "committed" => Ok(Self::Committed),
            "expired" => Ok(Self::Expired),
            "released" | "missing" => Ok(Self::Gone),
            _ => Err(StockError::UnexpectedReply(vec![reply])),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseOutcome {
    Released,
    AlreadyReleased,
    /// Sold units are never given back.
    WasCommitted,
    Missing,
}

impl ReleaseOutcome {
    pub fn from_reply(reply: String) -> Result<Self, StockError> {
        match reply.as_str() {
            "released" => Ok(Self::Released),
            "already_released" => Ok(Self::AlreadyReleased),
            "committed" => Ok(Self::WasCommitted),
            "missing" => Ok(Self::Missing),
            _ => Err(StockError::UnexpectedReply(vec![reply])),
        }
    }
}

pub async fn connect(settings: &RedisSettings) -> Result<ConnectionManager, StockError> {
    let client = redis::Client::open(settings.url.as_str())?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(std::time::Duration::from_secs(2))
        .set_response_timeout(std::time::Duration::from_secs(5))
        .set_number_of_retries(3);
    Ok(ConnectionManager::new_with_config(client, config).await?)
}

#[derive(Clone)]
pub struct StockStore {
    conn: ConnectionManager,
    retention_ms: u64,
}

impl StockStore {
    pub fn new(conn: ConnectionManager, settings: &RedisSettings) -> Self {
        Self {
            conn,
            retention_ms: settings.retention.as_millis() as u64,
        }
    }

    /// Whether Redis answers: the readiness probe.
    pub async fn ping(&self) -> Result<(), StockError> {
        redis::cmd("PING")
            .query_async::<String>(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Replaces whatever Redis held for `sku` with a fresh sale.
    pub async fn load_sale(&self, sku: &Sku, rules: &SaleRules) -> Result<(), StockError> {
        let keys = SkuKeys::new(sku);
        let mut conn = self.conn.clone();
        let mut stale: Vec<String> = Vec::new();
        {
            let mut iter = conn.scan_match::<_, String>(keys.pattern()).await?;
            while let Some(key) = futures::StreamExt::next(&mut iter).await {
                stale.push(key);
            }
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for chunk in stale.chunks(500) {
            pipe.del(chunk).ignore();
        }
        pipe.hset_multiple(
            keys.stock(),
            &[
                ("sale_id", rules.sale_id.clone()),
                ("total", rules.total.to_string()),
                ("available", rules.total.to_string()),
                ("reserved", "0".into()),
                ("sold", "0".into()),
                ("per_user_limit", rules.per_user_limit.to_string()),
                ("price_cents", rules.price_cents.to_string()),
                ("ttl_ms", rules.reservation_ttl_ms.to_string()),
                ("starts_at_ms", rules.starts_at_ms.to_string()),
                ("ends_at_ms", rules.ends_at_ms.to_string()),
                ("sold_out", if rules.total == 0 { "1" } else { "0" }.into()),
                ("closed", "0".into()),
            ],
        )
        .ignore();
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    pub async fn levels(&self, sku: &Sku) -> Result<Option<StockLevels>, StockError> {
        let mut conn = self.conn.clone();
        let fields: HashMap<String, String> = conn.hgetall(SkuKeys::new(sku).stock()).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let num = |name: &str| {
            fields
                .get(name)
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(0)
        };
        Ok(Some(StockLevels {
            sale_id: fields.get("sale_id").cloned().unwrap_or_default(),
            total: num("total"),
            available: num("available"),
            reserved: num("reserved"),
            sold: num("sold"),
            sold_out: num("sold_out") == 1,
        }))
    }

    /// Whether the sku exists and, if so, whether it is sold out: the one
    /// question the gateway asks before queueing a purchase.
    pub async fn sold_out(&self, sku: &Sku) -> Result<Option<bool>, StockError> {
        let mut conn = self.conn.clone();
        let (total, sold_out): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(SkuKeys::new(sku).stock())
            .arg("total")
            .arg("sold_out")
            .query_async(&mut conn)
            .await?;
        Ok(total.map(|_| sold_out.as_deref() == Some("1")))
    }

    pub async fn reserve(
        &self,
        request: &PurchaseRequest,
        now_ms: u64,
        max_queue_age_ms: u64,
    ) -> Result<ReserveOutcome, StockError> {
        let keys = SkuKeys::new(&request.sku);
        let reply: Vec<String> = RESERVE
            .key(keys.stock())
            .key(keys.users())
            .key(keys.processed(request.request_id))
            .key(keys.reservation(request.request_id))
            .arg(request.user_id.as_str())
            .arg(request.quantity.get())
            .arg(now_ms)
            .arg(request.accepted_at_ms)
            .arg(max_queue_age_ms)
            .arg(self.retention_ms)
            .invoke_async(&mut self.conn.clone())
            .await?;
        ReserveOutcome::from_reply(reply)
    }

    pub async fn commit(
        &self,
        sku: &Sku,
        id: RequestId,
        now_ms: u64,
    ) -> Result<CommitOutcome, StockError> {
        let keys = SkuKeys::new(sku);
        let reply: String = COMMIT
            .key(keys.stock())
            .key(keys.reservation(id))
            .arg(now_ms)
            .invoke_async(&mut self.conn.clone())
            .await?;
        CommitOutcome::from_reply(reply)
    }

    pub async fn release(&self, sku: &Sku, id: RequestId) -> Result<ReleaseOutcome, StockError> {
        let keys = SkuKeys::new(sku);
        let reply: String = RELEASE
            .key(keys.stock())
            .key(keys.users())
            .key(keys.reservation(id))
            .invoke_async(&mut self.conn.clone())
            .await?;
        ReleaseOutcome::from_reply(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn reserve_replies() {
        assert_eq!(
            ReserveOutcome::from_reply(strings(&["reserved", "10", "500", "s1"])).unwrap(),
            ReserveOutcome::Reserved {
                expires_at_ms: 10,
                amount_cents: 500,
                sale_id: "s1".into()
            }
        );
        assert_eq!(
            ReserveOutcome::from_reply(strings(&["rejected", "sold_out"])).unwrap(),
            ReserveOutcome::Rejected {
                reason: "sold_out".into()
            }
        );
        for bad in [
            strings(&[]),
            strings(&["reserved", "x", "1", "s"]),
            strings(&["maybe", "x"]),
        ] {
            assert!(ReserveOutcome::from_reply(bad).is_err());
        }
    }

    #[test]
    fn commit_and_release_replies() {
        assert_eq!(
            CommitOutcome::from_reply("committed".into()).unwrap(),
            CommitOutcome::Committed
        );
        assert_eq!(
            CommitOutcome::from_reply("expired".into()).unwrap(),
            CommitOutcome::Expired
        );
        assert_eq!(
            CommitOutcome::from_reply("missing".into()).unwrap(),
            CommitOutcome::Gone
        );
        assert!(CommitOutcome::from_reply("?".into()).is_err());
        assert_eq!(
            ReleaseOutcome::from_reply("already_released".into()).unwrap(),
            ReleaseOutcome::AlreadyReleased
        );
        assert!(ReleaseOutcome::from_reply("?".into()).is_err());
    }

    #[test]
    fn every_key_of_a_sku_shares_its_hash_tag() {
        let keys = SkuKeys::new(&Sku::parse("tv-1").unwrap());
        let id = RequestId::fresh();
        for key in [
            keys.stock(),
            keys.users(),
            keys.processed(id),
            keys.reservation(id),
        ] {
            assert!(key.starts_with("fs:{tv-1}:"), "{key}");
        }
    }
}
