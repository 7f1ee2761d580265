//! Which skus are closed, over, or have no room in their line, kept in memory so
//! that the gateway can refuse a purchase of one without a network call;
//! and which purchases were let into each sku's line, so that a repeated
//! POST (same Idempotency-Key) for a full sku is refused from memory too,
//! unless it names a purchase that was let in.
//!
//! The stock scripts publish every flip of a flag on `FLAGS_CHANNEL` from
//! inside the script that made it, so the copy here follows Redis within a
//! round trip. Messages sent while this instance was not subscribed are
//! lost; the copy is therefore reread in full after every (re)subscription,
//! and every `refresh` interval as a safety net.
//!
//! A full reread races with messages: it may read a sku just before a flip
//! whose message arrives before the reread is applied. The copy therefore
//! skips, in a reread, every sku that got a message since the reread began:
//! that message (or a later one) is at least as new.
//!
//! The same subscription carries every status change (`STATUS_CHANNEL`),
//! which wakes the long-polls waiting on it (`waiters`).
//!
//! Admissions are published by `admit.lua` before the flag flip that makes
//! a line full, on the same connection, so a copy that shows a sku full has
//! heard of every purchase let in before. Until the admitted sets were
//! reread after a (re)subscription, the copy cannot tell, and says so.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use flashsale_core::ids::{RequestId, Sku};
use flashsale_core::service::redis_conn;
use flashsale_core::service::settings::RedisSettings;
use flashsale_core::status::board::STATUS_CHANNEL;
use flashsale_core::stock::{ADMITTED_CHANNEL, FLAGS_CHANNEL, SkuFlags, StockStore};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::waiters::Waiters;

#[derive(Debug, Clone, Copy)]
struct Entry {
    flags: SkuFlags,
    /// The message count when a message last set this entry.
    message: u64,
}

#[derive(Debug, Default)]
pub struct FlagCopy {
    skus: RwLock<HashMap<String, Entry>>,
    messages: AtomicU64,
    /// Request ids let into each sku's line in its current sale.
    admitted: RwLock<HashMap<String, HashSet<RequestId>>>,
    /// The admitted sets are complete: reread since the last subscription.
    admitted_complete: AtomicBool,
}

impl FlagCopy {
    /// The flags last heard of, `None` for a sku this instance never saw.
    pub fn get(&self, sku: &Sku) -> Option<SkuFlags> {
        self.read().get(sku.as_str()).map(|e| e.flags)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Entry>> {
        // Entries are plain values: a writer that panicked left them whole.
        self.skus.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Entry>> {
        self.skus.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether purchase `id` may have been let into the sku's line: only
    /// then can a refusal not be decided from memory.
    pub fn may_be_admitted(&self, sku: &Sku, id: RequestId) -> bool {
        !self.admitted_complete.load(Ordering::SeqCst)
            || self
                .admitted
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(sku.as_str())
                .is_some_and(|ids| ids.contains(&id))
    }

    /// An admission this instance just made: known at once, not when its
    /// message comes back on `ADMITTED_CHANNEL`, which lags seconds behind
    /// when Redis is slow. Without it, the buyer's retry, sent before the
    /// message came back, was refused "sold out" from memory while the
    /// purchase it repeated went on (chaos campaign, seed 7, round 43).
    pub fn note_admitted(&self, sku: &Sku, id: RequestId) {
        self.admitted
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(sku.to_string())
            .or_default()
            .insert(id);
    }

    /// Applies a message of `ADMITTED_CHANNEL`: an id let in, or `*` (a new
    /// sale: forget the earlier one's).
    pub fn apply_admitted(&self, message: &str) -> bool {
        let Some((sku, id)) = message.split_once(' ') else {
            return false;
        };
        let mut admitted = self.admitted.write().unwrap_or_else(|e| e.into_inner());
        if id == "*" {
            admitted.remove(sku);
            return true;
        }
        match RequestId::parse(id) {
            Ok(id) => admitted.entry(sku.to_owned()).or_default().insert(id),
            Err(_) => return false,
        };
        true
    }

    fn admitted_incomplete(&self) {
        self.admitted_complete.store(false, Ordering::SeqCst);
    }

    fn apply_admitted_reread(&self, read: Vec<(Sku, Vec<RequestId>)>) {
        let mut admitted = self.admitted.write().unwrap_or_else(|e| e.into_inner());
        for (sku, ids) in read {
            admitted.entry(sku.to_string()).or_default().extend(ids);
        }
        self.admitted_complete.store(true, Ordering::SeqCst);
    }

    pub fn apply_message(&self, sku: &Sku, flags: SkuFlags) {
        let message = self.messages.fetch_add(1, Ordering::SeqCst) + 1;
        self.write()
            .insert(sku.to_string(), Entry { flags, message });
    }

    /// Marks the start of a full reread; pass the mark to `apply_reread`.
    pub fn begin_reread(&self) -> u64 {
        self.messages.load(Ordering::SeqCst)
    }

    pub fn apply_reread(&self, began: u64, read: &[(Sku, SkuFlags)]) {
        let mut skus = self.write();
        for (sku, flags) in read {
            match skus.get_mut(sku.as_str()) {
                Some(entry) if entry.message > began => {}
                Some(entry) => entry.flags = *flags,
                None => {
                    skus.insert(
                        sku.to_string(),
                        Entry {
                            flags: *flags,
                            message: 0,
                        },
                    );
                }
            }
        }
    }
}

/// Rereads every sku's admitted set: after a (re)subscription only, as
/// admissions are never undone within a sale and no message is lost while
/// subscribed.
async fn reread_admitted(
    copy: &FlagCopy,
    stock: &StockStore,
) -> Result<(), flashsale_core::stock::StockError> {
    let skus = stock.sale_skus().await?;
    let read = futures::future::join_all(
        skus.into_iter()
            .map(|sku| async move { stock.admitted_ever(&sku).await.map(|ids| (sku, ids)) }),
    )
    .await;
    let read = read.into_iter().collect::<Result<Vec<_>, _>>()?;
    copy.apply_admitted_reread(read);
    Ok(())
}

/// Rereads the flags of every sku with a sale.
async fn reread(
    copy: &FlagCopy,
    stock: &StockStore,
) -> Result<usize, flashsale_core::stock::StockError> {
    let began = copy.begin_reread();
    let skus = stock.sale_skus().await?;
    // One read per sku, concurrently: each is a single-slot command, so
    // this works on a cluster too.
    let read =
        futures::future::join_all(skus.into_iter().map(|sku| async move {
            stock.flags(&sku).await.map(|flags| flags.map(|f| (sku, f)))
        }))
        .await;
    let mut found = Vec::with_capacity(read.len());
    for result in read {
        // A sku Redis lost keeps its last known flags until it is recovered
        // (recovery publishes the restored ones).
        if let Some(pair) = result? {
            found.push(pair);
        }
    }
    copy.apply_reread(began, &found);
    Ok(found.len())
}

/// Keeps `copy` current until `shutdown`: subscribes, rereads after every
/// subscription and every `refresh`, and resubscribes with backoff when the
/// connection drops (a Redis restart).
pub async fn follow(
    copy: Arc<FlagCopy>,
    waiters: Arc<Waiters>,
    stock: StockStore,
    redis: RedisSettings,
    refresh: Duration,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(50);
    let mut node = 0usize;
    while !shutdown.is_cancelled() {
        // On a cluster, any node hears every publish; try them in turn.
        let url = match redis.cluster_nodes.as_slice() {
            [] => redis.url.clone(),
            nodes => nodes[node % nodes.len()].clone(),
        };
        node += 1;
        let subscribed = async {
            let mut pubsub = redis_conn::client(&redis, &url)?.get_async_pubsub().await?;
            pubsub.subscribe(FLAGS_CHANNEL).await?;
            pubsub.subscribe(ADMITTED_CHANNEL).await?;
            pubsub.subscribe(STATUS_CHANNEL).await?;
            Ok::<_, redis::RedisError>(pubsub)
        }
        .await;
        let pubsub = match subscribed {
            Ok(pubsub) => pubsub,
            Err(error) => {
                tracing::warn!(%error, %url, "cannot subscribe to sku flags; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        copy.admitted_incomplete();
        // Status changes may have been missed while unsubscribed.
        waiters.wake_all();
        metrics.flags_subscribed.set(1);
        tracing::info!(%url, "following sku flags");
        let mut messages = pubsub.into_on_message();
        let mut every = tokio::time::interval(refresh);
        let mut admitted_reread = false;
        // The first tick is immediate: the reread after subscribing.
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                message = messages.next() => {
                    let Some(message) = message else {
                        tracing::warn!("sku flags subscription lost; resubscribing");
                        break;
                    };
                    let payload: String = message.get_payload().unwrap_or_default();
                    if message.get_channel_name() == STATUS_CHANNEL {
                        if let Ok(id) = RequestId::parse(&payload) {
                            waiters.wake(id);
                        }
                        continue;
                    }
                    if message.get_channel_name() == ADMITTED_CHANNEL {
                        if !copy.apply_admitted(&payload) {
                            tracing::warn!(%payload, "unreadable admission message");
                        }
                        continue;
                    }
                    match SkuFlags::from_message(&payload) {
                        Some((sku, flags)) => {
                            copy.apply_message(&sku, flags);
                            metrics.flag_messages.inc();
                        }
                        None => tracing::warn!(%payload, "unreadable sku flags message"),
                    }
                }
                _ = every.tick() => {
                    match reread(&copy, &stock).await {
                        Ok(_) => metrics.flag_rereads.inc(),
                        Err(error) => tracing::warn!(%error, "rereading sku flags failed"),
                    }
                    if !admitted_reread {
                        match reread_admitted(&copy, &stock).await {
                            Ok(()) => admitted_reread = true,
                            Err(error) => tracing::warn!(%error, "rereading admissions failed"),
                        }
                    }
                }
            }
        }
        metrics.flags_subscribed.set(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sku(name: &str) -> Sku {
        Sku::parse(name).expect("sku")
    }

    const SOLD_OUT: SkuFlags = SkuFlags {
        sold_out: true,
        closed: false,
        line_full: true,
        ends_at_ms: 0,
    };
    const OPEN: SkuFlags = SkuFlags {
        sold_out: false,
        closed: false,
        line_full: false,
        ends_at_ms: 0,
    };

    #[test]
    fn a_reread_never_undoes_a_newer_message() {
        let copy = FlagCopy::default();
        copy.apply_message(&sku("a"), OPEN);
        let began = copy.begin_reread();
        // The reread saw "a" sold out and "b" open; then "a" was released.
        copy.apply_message(&sku("a"), OPEN);
        copy.apply_reread(began, &[(sku("a"), SOLD_OUT), (sku("b"), OPEN)]);
        assert_eq!(copy.get(&sku("a")), Some(OPEN));
        assert_eq!(copy.get(&sku("b")), Some(OPEN));
        assert_eq!(copy.get(&sku("c")), None);
        let began = copy.begin_reread();
        copy.apply_reread(began, &[(sku("a"), SOLD_OUT)]);
        assert_eq!(copy.get(&sku("a")), Some(SOLD_OUT), "no newer message");
    }

    #[test]
    fn only_a_complete_admitted_set_refuses_from_memory() {
        let copy = FlagCopy::default();
        let (ann, ben) = (RequestId::fresh(), RequestId::fresh());
        assert!(copy.may_be_admitted(&sku("a"), ann), "nothing reread yet");
        copy.apply_admitted_reread(vec![(sku("a"), vec![ann])]);
        assert!(copy.may_be_admitted(&sku("a"), ann));
        assert!(!copy.may_be_admitted(&sku("a"), ben));
        assert!(copy.apply_admitted(&format!("a {ben}")));
        assert!(copy.may_be_admitted(&sku("a"), ben));
        assert!(!copy.may_be_admitted(&sku("b"), ben), "another sku");
        assert!(copy.apply_admitted("a *"), "a new sale");
        assert!(!copy.may_be_admitted(&sku("a"), ann));
        assert!(!copy.apply_admitted("a not-an-id"));
        let cid = RequestId::fresh();
        assert!(!copy.may_be_admitted(&sku("a"), cid));
        copy.note_admitted(&sku("a"), cid);
        assert!(
            copy.may_be_admitted(&sku("a"), cid),
            "let in here, before its message"
        );
        copy.admitted_incomplete();
        assert!(copy.may_be_admitted(&sku("a"), ann), "resubscribed");
    }
}
