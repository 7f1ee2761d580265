//! Where every purchase's current state is posted for the buyer to read.
//!
//! One Redis hash per purchase, `fs:purchase:{<request id>}`, written only
//! through `purchase_status.lua`, which refuses to move a state backwards. Each
//! stage posts after its own effect is durable, and a redelivered message
//! posts again harmlessly, so the board never shows a state that did not
//! happen and ends at the purchase's terminal state.

use std::collections::HashMap;

use crate::service::redis_conn::RedisConn;
use redis::AsyncCommands;

use crate::ids::{Quantity, RequestId, Sku, UserId};
use crate::service::settings::RedisSettings;
use crate::status::{PurchaseState, PurchaseStatus};

static POST: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("purchase_status.lua")));

/// Where `purchase_status.lua` publishes the request id of every status it
/// writes: what a gateway's long-polls wait on. Outside any hash tag: Redis
/// Cluster forwards a publish to every node.
pub const STATUS_CHANNEL: &str = "fs:status";

/// The Redis key of a purchase's status.
pub fn key(id: &str) -> String {
    format!("fs:purchase:{{{id}}}")
}

/// What a status post says about which purchase.
#[derive(Debug)]
pub struct Subject<'a> {
    pub id: RequestId,
    pub sku: &'a Sku,
    pub user: &'a UserId,
    pub quantity: Quantity,
}

#[derive(Debug, Clone)]
pub struct StatusBoard {
    conn: RedisConn,
    retention_ms: u64,
}

impl StatusBoard {
    pub fn new(conn: RedisConn, settings: &RedisSettings) -> Self {
        Self {
            conn,
            retention_ms: settings.retention.as_millis() as u64,
        }
    }

    /// Posts `state`; returns false when the board already showed the
    /// purchase as far along (or at a terminal state).
    pub async fn post(
        &self,
        subject: &Subject<'_>,
        state: PurchaseState,
        reason: Option<&str>,
        now_ms: u64,
    ) -> Result<bool, redis::RedisError> {
        self.write(subject, state, reason, now_ms, None).await
    }

    /// Posts `queued` with where the purchase's record is (partition,
    /// offset), from which its place in the queue is told.
    pub async fn post_queued(
        &self,
        subject: &Subject<'_>,
        record: (i32, i64),
        now_ms: u64,
    ) -> Result<bool, redis::RedisError> {
        self.write(subject, PurchaseState::Queued, None, now_ms, Some(record))
            .await
    }

    async fn write(
        &self,
        subject: &Subject<'_>,
        state: PurchaseState,
        reason: Option<&str>,
        now_ms: u64,
        record: Option<(i32, i64)>,
    ) -> Result<bool, redis::RedisError> {
        let mut call = POST.key(key(&subject.id.to_string()));
        call.arg(state.as_str())
            .arg(state.rank())
            .arg(reason.unwrap_or(""))
            .arg(now_ms)
            .arg(self.retention_ms)
            .arg(subject.sku.as_str())
            .arg(subject.user.as_str())
            .arg(subject.quantity.get());
        if let Some((partition, offset)) = record {
            call.arg(partition).arg(offset);
        }
        let written: i64 = call.invoke_async(&mut self.conn.clone()).await?;
        Ok(written == 1)
    }

    /// Takes a purchase off the board (one whose buyer was told it failed,
    /// and that nobody will process).
    pub async fn forget(&self, id: RequestId) -> Result<(), redis::RedisError> {
        self.conn.clone().del(key(&id.to_string())).await
    }

    pub async fn get(&self, id: RequestId) -> Result<Option<PurchaseStatus>, redis::RedisError> {
        let fields: HashMap<String, String> =
            self.conn.clone().hgetall(key(&id.to_string())).await?;
        Ok(from_fields(id, fields))
    }

    /// States of many purchases in one round trip (the surge watches
    /// thousands at once).
    pub async fn get_many(
        &self,
        ids: &[RequestId],
    ) -> Result<Vec<Option<PurchaseStatus>>, redis::RedisError> {
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.hgetall(key(&id.to_string()));
        }
        let all: Vec<HashMap<String, String>> = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(ids
            .iter()
            .zip(all)
            .map(|(id, fields)| from_fields(*id, fields))
            .collect())
    }
}

fn from_fields(id: RequestId, fields: HashMap<String, String>) -> Option<PurchaseStatus> {
    let status = fields.get("status")?.parse().ok()?;
    Some(PurchaseStatus {
        request_id: id.to_string(),
        sku: fields.get("sku").cloned().unwrap_or_default(),
        user_id: fields.get("user_id").cloned().unwrap_or_default(),
        quantity: fields
            .get("quantity")
            .and_then(|q| q.parse().ok())
            .unwrap_or(0),
        status,
        reason: fields.get("reason").filter(|r| !r.is_empty()).cloned(),
        updated_at_ms: fields
            .get("updated_at_ms")
            .and_then(|t| t.parse().ok())
            .unwrap_or(0),
        record: fields
            .get("partition")
            .and_then(|p| p.parse().ok())
            .zip(fields.get("offset").and_then(|o| o.parse().ok())),
        queue_position: None,
        units_may_return: None,
        wait_at_most_s: None,
        waiting_since_ms: fields.get("waiting_since_ms").and_then(|t| t.parse().ok()),
    })
}
