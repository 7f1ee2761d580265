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

use std::sync::Arc;
use std::time::Duration;

use flashsale_core::clock;
use flashsale_core::ids::Sku;
use flashsale_core::retry;
use flashsale_core::status::{PurchaseState, reason};
use flashsale_core::status_board::Subject;
use flashsale_core::stock::Answered;

use crate::Shop;

pub(crate) async fn run(shop: Arc<Shop>, interval: Duration, batch: usize) {
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
                continue;
            }
        };
        for sku in skus {
            if sweep_sku(&shop, &sku, batch).await.is_err() {
                return;
            }
        }
    }
}

/// Sweeps one sku until fewer than a batch were due. `Err` on shutdown.
async fn sweep_sku(shop: &Shop, sku: &Sku, batch: usize) -> Result<(), ()> {
    loop {
        // One id and one `now` per batch, kept across retries: a call whose
        // reply was lost is answered again from the sweep's marker, so the
        // buyers of what it released are still told.
        let sweep_id = uuid::Uuid::now_v7().to_string();
        let now = clock::now_ms();
        let Answered {
            outcome: expired,
            line,
        } = retry::durable("expire", &shop.shutdown, || {
            shop.stock.expire(sku, &sweep_id, now, batch)
        })
        .await
        .map_err(|_| ())?;
        shop.tell_line(sku, &line).await.map_err(|_| ())?;
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
            .await
            .map_err(|_| ())?;
        }
        if swept < batch {
            break;
        }
    }
    loop {
        let now = clock::now_ms();
        let line = retry::durable("serve the line", &shop.shutdown, || {
            shop.stock.serve(sku, now, shop.line_patience_ms, batch)
        })
        .await
        .map_err(|_| ())?;
        shop.tell_line(sku, &line).await.map_err(|_| ())?;
        if line.len() < batch {
            return Ok(());
        }
    }
}
