//! The expiry sweep: gives back the units of reservations whose deadline
//! passed without a commit, and tells their buyers; then walks each sku's
//! line (`serve.lua`): turns away buyers who stopped asking, serves the
//! head of a sale that just opened, turns a closed sale's line away, and
//! tells the waiters that a dead worker (or a restock) left untold.
//!
//! Every shop-worker sweeps every sale. Two workers sweeping the same sku
//! at once cannot release a reservation twice: `expire.lua` moves a record
//! out of `reserved` atomically, and a release or commit racing it finds
//! the record already moved. No lock is needed, and a worker that dies
//! mid-sweep leaves nothing half-done.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flashsale_core::clock;
use flashsale_core::ids::Sku;
use flashsale_core::service::retry;
use flashsale_core::service::retry::Stop;
use flashsale_core::status::board::Subject;
use flashsale_core::status::{PurchaseState, reason};
use flashsale_core::stock::Answered;

use crate::handler::loaded;

use crate::Shop;

/// How the sweep is doing, for `/readyz`: a worker whose sweep has not
/// completed a round for a while gives no units back, and says so.
pub(crate) struct SweepProgress {
    interval: Duration,
    /// When the last complete round ended (ms), or the sweep began.
    last_round_ms: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// Rounds a sweep may miss before the worker is not ready (at least
/// `STALE_FLOOR`): one slow round is not a problem.
const STALE_ROUNDS: u32 = 5;
const STALE_FLOOR: Duration = Duration::from_secs(3);

impl SweepProgress {
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            interval,
            last_round_ms: AtomicU64::new(clock::now_ms()),
            last_error: Mutex::new(None),
        }
    }

    fn completed(&self) {
        self.last_round_ms.store(clock::now_ms(), Ordering::Relaxed);
        if let Ok(mut error) = self.last_error.lock() {
            *error = None;
        }
    }

    fn failed(&self, error: String) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(error);
        }
    }

    /// `call`'s result, its error noted as the sweep's latest.
    async fn noted<T, E: std::fmt::Display>(
        &self,
        call: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let result = call.await;
        if let Err(error) = &result {
            self.failed(error.to_string());
        }
        result
    }

    /// Why the sweep is behind, if it is.
    pub(crate) fn problem(&self) -> Option<String> {
        let since = Duration::from_millis(
            clock::now_ms().saturating_sub(self.last_round_ms.load(Ordering::Relaxed)),
        );
        if since <= (self.interval * STALE_ROUNDS).max(STALE_FLOOR) {
            return None;
        }
        let error = self
            .last_error
            .lock()
            .ok()
            .and_then(|e| e.clone())
            .unwrap_or_else(|| "a round is still running".into());
        Some(format!(
            "the expiry sweep has not completed a round for {} s: {error}",
            since.as_secs()
        ))
    }
}

/// Sweeps every sale each `interval` until shutdown. A round that fails
/// (Redis refusing writes, unreachable, out of memory) is logged and tried
/// again at the next one: the sweep never stops before the worker does.
pub(crate) async fn run(
    shop: Arc<Shop>,
    interval: Duration,
    batch: usize,
    progress: Arc<SweepProgress>,
) {
    let batch = batch.max(1);
    loop {
        tokio::select! {
            _ = shop.shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let skus = match shop.stock.sale_skus().await {
            Ok(skus) => skus,
            Err(error) => {
                tracing::warn!(%error, "expiry sweep: cannot list the sales; next round");
                progress.failed(format!("cannot list the sales: {error}"));
                continue;
            }
        };
        let mut complete = true;
        for sku in skus {
            if let Err(stop) = sweep_sku(&shop, &sku, batch, &progress).await {
                if shop.shutdown.is_cancelled() {
                    return;
                }
                let error = stop.to_string();
                tracing::warn!(%sku, %error, "expiry sweep failed; next round");
                progress.failed(error);
                complete = false;
            }
        }
        if complete {
            progress.completed();
        }
    }
}

/// Sweeps one sku until fewer than a batch were due.
/// Each failed attempt of its store calls is noted in `progress` (they are
/// retried until they succeed, their deadline, or the worker stops; then
/// the next sku is swept, and this one again next round).
async fn sweep_sku(
    shop: &Shop,
    sku: &Sku,
    batch: usize,
    progress: &SweepProgress,
) -> Result<(), Stop> {
    loop {
        // One id and one `now` per batch, kept across retries: a call whose
        // reply was lost is answered again from the sweep's marker, so the
        // buyers of what it released are still told.
        let sweep_id = uuid::Uuid::now_v7().to_string();
        let now = clock::now_ms();
        let expire = || progress.noted(loaded(shop.stock.expire(sku, &sweep_id, now, batch)));
        let Some(Answered {
            outcome: expired,
            line,
        }) = retry::durable_until("expire", &shop.shutdown, shop.deadline(), expire).await?
        else {
            // Redis lost this sku's stock: nothing of it is held until
            // its recovery, and the other skus are swept meanwhile.
            return Ok(());
        };
        shop.tell_line(sku, &line).await?;
        let swept = expired.len();
        if swept > 0 {
            tracing::info!(%sku, released = swept, "expiry sweep released reservations");
            shop.metrics.expired.inc_by(swept as u64);
        }
        for reservation in expired {
            let subject = Subject {
                id: reservation.id,
                sku,
                user: &reservation.user,
                quantity: reservation.quantity,
            };
            shop.post(
                &subject,
                PurchaseState::Cancelled,
                Some(reason::RESERVATION_EXPIRED),
            )
            .await?;
        }
        if swept < batch {
            break;
        }
    }
    loop {
        let now = clock::now_ms();
        let serve = || {
            progress.noted(loaded(shop.stock.serve(
                sku,
                now,
                shop.line_patience_ms,
                batch,
            )))
        };
        let Some(line) =
            retry::durable_until("serve the line", &shop.shutdown, shop.deadline(), serve).await?
        else {
            return Ok(());
        };
        shop.tell_line(sku, &line).await?;
        if line.len() < batch {
            return Ok(());
        }
    }
}
