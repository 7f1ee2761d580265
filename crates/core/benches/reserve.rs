//! Throughput of `reserve.lua` alone: one connection (one worker), requests
//! sent as pipelined `EVALSHA`s in batches, every one a fresh purchase that
//! reserves a unit. Run by `./scripts/bench-reserve`, which starts the Redis
//! and measures `redis-benchmark`'s trivial `EVALSHA` beside it.
//!
//! Prints one JSON object: requests, batch, seconds, reservations per second,
//! and the memory a processed request costs in Redis.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark stops at its first failure

use std::time::{Duration, Instant};

use flashsale_core::bus::messages::{PurchaseRequest, SCHEMA_VERSION};
use flashsale_core::ids::{Quantity, RequestId, Sku, UserId};
use flashsale_core::service::redis_conn;
use flashsale_core::service::settings::{Env, RedisSettings};
use flashsale_core::stock::{ReserveOutcome, SaleRules, SkuKeys, StockStore};

fn arg(name: &str, default: usize) -> usize {
    let flag = format!("--{name}=");
    std::env::args()
        .find_map(|a| a.strip_prefix(&flag).and_then(|v| v.parse().ok()))
        .unwrap_or(default)
}

async fn used_memory(conn: &mut redis_conn::RedisConn) -> anyhow::Result<i64> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(conn).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("INFO memory has no used_memory"))
}

async fn memory_usage(conn: &mut redis_conn::RedisConn, key: &str) -> anyhow::Result<i64> {
    Ok(redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(key)
        .arg("SAMPLES")
        .arg(0)
        .query_async::<Option<i64>>(conn)
        .await?
        .unwrap_or(0))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let requests = arg("requests", 200_000);
    let batch = arg("batch", 64).max(1);
    let settings = RedisSettings::from_env(&Env::process())?;
    let mut conn = redis_conn::connect(&settings).await?;
    let store = StockStore::new(conn.clone(), &settings);
    let sku = Sku::parse(&format!("bench-{}", uuid::Uuid::now_v7().simple()))?;
    let rules = SaleRules {
        sale_id: uuid::Uuid::now_v7().to_string(),
        total: requests as u64,
        per_user_limit: 1,
        price_cents: 100,
        reservation_ttl_ms: 600_000,
        starts_at_ms: 0,
        ends_at_ms: u64::MAX / 2,
        overbook: 1.5,
    };
    store.open_sale(&sku, &rules).await?;
    let all: Vec<PurchaseRequest> = (0..requests)
        .map(|n| -> anyhow::Result<PurchaseRequest> {
            Ok(PurchaseRequest {
                v: SCHEMA_VERSION,
                request_id: RequestId::fresh(),
                sku: sku.clone(),
                user_id: UserId::parse(&format!("user-{n}"))?,
                quantity: Quantity::new(1)?,
                accepted_at_ms: flashsale_core::clock::now_ms(),
            })
        })
        .collect::<anyhow::Result<_>>()?;

    let memory_before = used_memory(&mut conn).await?;
    let started = Instant::now();
    let mut reserved = 0usize;
    for chunk in all.chunks(batch) {
        let now = flashsale_core::clock::now_ms();
        for outcome in store.reserve_pipelined(chunk, now, 60_000).await? {
            if matches!(outcome?.outcome, ReserveOutcome::Reserved { .. }) {
                reserved += 1;
            }
        }
    }
    let elapsed = started.elapsed().max(Duration::from_micros(1));
    let memory_after = used_memory(&mut conn).await?;
    anyhow::ensure!(
        reserved == requests,
        "only {reserved} of {requests} reserved"
    );

    let keys = SkuKeys::new(&sku);
    let sample = all[requests / 2].request_id;
    let report = serde_json::json!({
        "requests": requests,
        "batch": batch,
        "seconds": elapsed.as_secs_f64(),
        "reservations_per_second": requests as f64 / elapsed.as_secs_f64(),
        "bytes_per_request_total": (memory_after - memory_before) as f64 / requests as f64,
        "bytes_processed_marker": memory_usage(&mut conn, &keys.processed(sample)).await?,
        "bytes_reservation_record": memory_usage(&mut conn, &keys.reservation(sample)).await?,
        "bytes_deadlines_zset_per_entry": memory_usage(&mut conn, &keys.deadlines()).await? as f64 / requests as f64,
        "bytes_users_hash_per_user": memory_usage(&mut conn, &keys.users()).await? as f64 / requests as f64,
    });
    println!("{report}");
    Ok(())
}
