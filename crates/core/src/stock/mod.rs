//! The stock of each sku in Redis, changed only through the Lua scripts.
//!
//! Every key of one sku carries the hash tag `{sku}` so a script touches a
//! single Redis Cluster slot. Scripts are atomic and idempotent per request
//! id, and take `now` from the caller, so replaying a Kafka message (or
//! racing two workers on one) never moves a unit twice.
//!
//! `keys`: where a sku's stock lives; `outcomes`: what the scripts answer,
//! and their parsers; `store`: the store that runs the scripts (`lua/`);
//! `herald`: telling buyers what a script decided. Here: the errors, and
//! the constants the gateway and the workers share.

pub mod herald;
mod keys;
mod outcomes;
mod store;

pub use keys::*;
pub use outcomes::*;
pub use store::*;

use std::collections::HashMap;

use redis::AsyncCommands;
use serde::Serialize;

use crate::bus::messages::PurchaseRequest;
use crate::ids::{Quantity, RequestId, Sku, UserId};
use crate::service::redis_conn::{self, RedisConn};
use crate::service::settings::RedisSettings;

/// Buyers per unit not yet sold who may hold or wait for one, when the
/// sale does not say.
pub const DEFAULT_OVERBOOK: f64 = 1.5;

/// Waiters one script serves or turns away at most; the sweep goes on with
/// the rest.
pub const SERVE_LIMIT: usize = 256;

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
    /// A restore of a sku Redis still holds: it is never written over.
    #[error("Redis still holds the stock of {0}: unload it before restoring it")]
    Loaded(Sku),
}

impl StockError {
    /// Worth retrying: the connection dropped, Redis is restarting, or the
    /// sku waits for its recovery.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Redis(e) => redis_is_transient(e),
            Self::UnexpectedReply(_) | Self::Loaded(_) => false,
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
