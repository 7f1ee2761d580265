//! What a surge watches while it runs, for its report's plots: each sku's
//! stock (available, reserved, sold) every half second, read from Redis,
//! and the consumer groups' lag every second, read from the broker (what
//! `flashsale lag` reads: watermarks and committed offsets, never joining
//! a group).

use std::collections::BTreeMap;
use std::time::Duration;

use flashsale_core::ids::Sku;
use flashsale_core::service::settings::KafkaSettings;
use flashsale_core::stock::StockStore;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A sku's stock at one instant.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StockSample {
    /// Milliseconds since the first intended arrival (negative before it).
    pub t_ms: i64,
    pub sku: String,
    pub available: i64,
    pub reserved: i64,
    pub sold: i64,
}

/// The groups' lag at one instant, in records.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LagSample {
    pub t_ms: i64,
    pub lag: BTreeMap<String, i64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Samples {
    pub stock: Vec<StockSample>,
    pub lag: Vec<LagSample>,
}

const STOCK_EVERY: Duration = Duration::from_millis(500);
const LAG_EVERY: Duration = Duration::from_secs(1);

/// Samples until `stop`; `start` is the surge's first intended arrival.
pub async fn watch(
    stock: StockStore,
    skus: Vec<Sku>,
    kafka: Option<KafkaSettings>,
    start: Instant,
    stop: CancellationToken,
) -> Samples {
    let since = move |now: Instant| -> i64 {
        if now >= start {
            now.duration_since(start).as_millis() as i64
        } else {
            -(start.duration_since(now).as_millis() as i64)
        }
    };
    let lag = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let Some(kafka) = kafka else {
                return samples;
            };
            let groups: Vec<String> = crate::lag::project_groups(&kafka)
                .into_iter()
                .map(|(g, _)| g)
                .collect();
            let mut every = tokio::time::interval(LAG_EVERY);
            while !stop.is_cancelled() {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = every.tick() => {}
                }
                match crate::lag::read(&kafka, &groups, &[], false).await {
                    Ok(read) => samples.push(LagSample {
                        t_ms: since(Instant::now()),
                        lag: read.into_iter().map(|g| (g.group, g.total_lag)).collect(),
                    }),
                    Err(error) => tracing::debug!(%error, "lag not sampled"),
                }
            }
            samples
        })
    };
    let mut out = Samples::default();
    let mut every = tokio::time::interval(STOCK_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = every.tick() => {}
        }
        let now = since(Instant::now());
        for sku in &skus {
            if let Ok(Some(levels)) = stock.levels(sku).await {
                out.stock.push(StockSample {
                    t_ms: now,
                    sku: sku.to_string(),
                    available: levels.available,
                    reserved: levels.reserved,
                    sold: levels.sold,
                });
            }
        }
    }
    out.lag = lag.await.unwrap_or_default();
    out
}
