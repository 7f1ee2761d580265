//! Who is consuming: each worker notes in Redis, every two seconds, that it
//! is alive in its consumer group, and takes the note back when it stops.
//! What must not run beside live workers (`flashsale recover --force`,
//! which rebuilds a sku the workers are still selling) asks first, and can
//! say which workers are in the way.
//!
//! The broker knows the groups' members too, but asking tansu 0.6 to
//! describe a group disturbed the group in our tries, and an operator's
//! tool must not disturb a running sale to find out.

use std::time::Duration;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::clock;
use crate::service::redis_conn::RedisConn;

/// How often a worker notes that it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// A member not seen for this long is taken to be gone (killed, or cut off
/// from Redis): three heartbeats missed.
pub const GONE_AFTER: Duration = Duration::from_secs(6);

/// One worker of a consumer group, as it last noted itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    /// `shop-worker` or `order-worker`.
    pub service: String,
    pub host: String,
    pub pid: u32,
    pub seen_ms: u64,
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ago = clock::now_ms().saturating_sub(self.seen_ms) as f64 / 1000.0;
        write!(
            f,
            "{} on {} (pid {}, seen {ago:.1} s ago)",
            self.service, self.host, self.pid
        )
    }
}

/// The hash of a group's members, under the group's own hash tag.
fn key(group: &str) -> String {
    format!("fs:members:{{{group}}}")
}

/// A worker's own note in its group.
#[derive(Debug)]
pub struct Membership {
    conn: RedisConn,
    key: String,
    me: Member,
}

impl Membership {
    pub fn new(conn: RedisConn, group: &str, service: &str) -> Self {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown".into());
        Self {
            conn,
            key: key(group),
            me: Member {
                id: uuid::Uuid::now_v7().simple().to_string(),
                service: service.to_owned(),
                host,
                pid: std::process::id(),
                seen_ms: 0,
            },
        }
    }

    async fn beat(&mut self) -> Result<(), redis::RedisError> {
        self.me.seen_ms = clock::now_ms();
        let note = serde_json::to_string(&self.me).unwrap_or_default();
        let mut conn = self.conn.clone();
        let _: () = conn.hset(&self.key, &self.me.id, note).await?;
        // A group nobody notes for a day is forgotten.
        let _: () = conn.expire(&self.key, 24 * 3600).await?;
        Ok(())
    }

    /// Notes this worker alive every `HEARTBEAT` until `shutdown`, then
    /// takes the note back. A Redis that does not answer costs a missed
    /// beat, never the worker.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut every = tokio::time::interval(HEARTBEAT);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = every.tick() => {
                    if let Err(error) = self.beat().await {
                        tracing::warn!(%error, "cannot note this worker alive in Redis");
                    }
                }
            }
        }
        let mut conn = self.conn.clone();
        if let Err(error) = conn.hdel::<_, _, ()>(&self.key, &self.me.id).await {
            tracing::warn!(%error, "cannot take back this worker's note in Redis");
        }
    }
}

/// The members of `group` seen within `GONE_AFTER`; the notes of the gone
/// are removed on the way.
pub async fn live(conn: &RedisConn, group: &str) -> Result<Vec<Member>, redis::RedisError> {
    let mut conn = conn.clone();
    let key = key(group);
    let notes: std::collections::HashMap<String, String> = conn.hgetall(&key).await?;
    let now = clock::now_ms();
    let mut live = Vec::new();
    for (id, note) in notes {
        match serde_json::from_str::<Member>(&note) {
            Ok(member) if now.saturating_sub(member.seen_ms) <= GONE_AFTER.as_millis() as u64 => {
                live.push(member)
            }
            _ => {
                let _: () = conn.hdel(&key, &id).await?;
            }
        }
    }
    live.sort_by(|a, b| (&a.service, &a.host, a.pid).cmp(&(&b.service, &b.host, b.pid)));
    Ok(live)
}
