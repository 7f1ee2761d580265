//! The gateways' in-memory line-full flag (what they answer `sold-out`
//! with) follows Redis: set within 100 ms of the last unit being spoken for
//! and cleared within 100 ms of a release, on two gateway instances at once; and it keeps following through a Redis restart and a
//! lost message. A test binary of its own, so that no crowd of another test
//! shares the CPU while it times.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure here is the test's answer

use std::time::{Duration, Instant};

use flashsale_testkit::flashsale_cli::sale::SaleSpec;
use flashsale_testkit::flashsale_core::bus::messages::{PurchaseRequest, SCHEMA_VERSION};
use flashsale_testkit::flashsale_core::clock;
use flashsale_testkit::flashsale_core::ids::{Quantity, RequestId, Sku, UserId};
use flashsale_testkit::flashsale_core::stock::{ReserveOutcome, SkuKeys};
use flashsale_testkit::{Pipeline, PipelineOptions, eventually, eventually_reads};

/// What a shop-worker would reserve: one unit for a buyer of its own.
fn one_unit(p: &Pipeline, sku: &Sku, n: u32) -> PurchaseRequest {
    PurchaseRequest {
        v: SCHEMA_VERSION,
        request_id: RequestId::fresh(),
        sku: sku.clone(),
        user_id: UserId::parse(&format!("{}-flip{n}", p.prefix)).unwrap(),
        quantity: Quantity::new(1).unwrap(),
        accepted_at_ms: clock::now_ms(),
    }
}

/// The line-full flag a gateway answers purchases with.
async fn flag_of(p: &Pipeline, url: &str, sku: &Sku) -> Option<bool> {
    p.sku_view(url, sku).await?["gateway"]["line_full"].as_bool()
}

/// A sale of one unit with no room to wait: the line is full as soon as
/// the unit is reserved.
async fn one_unit_sale(p: &Pipeline, sku: &Sku) {
    p.create_sale_with(&SaleSpec {
        overbook: 1.0,
        ..Pipeline::spec(sku, 1, 1)
    })
    .await
    .unwrap();
}

/// How long until every gateway shows `sold_out`, polling without pause;
/// gives up after a second.
async fn until_all_show(p: &Pipeline, sku: &Sku, sold_out: bool, since: Instant) -> Duration {
    for url in &p.gateway_urls {
        while flag_of(p, url, sku).await != Some(sold_out) {
            assert!(
                since.elapsed() < Duration::from_secs(1),
                "{url} still shows sold_out={} after 1 s",
                !sold_out
            );
        }
    }
    since.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sold_out_flag_reaches_two_gateways_within_100_ms_both_ways() {
    let p = Pipeline::start(PipelineOptions {
        shop_workers: 0,
        order_workers: 0,
        gateways: 2,
        ..Default::default()
    })
    .await
    .expect("pipeline starts");
    let sku = p.sku("flag");
    one_unit_sale(&p, &sku).await;
    for url in &p.gateway_urls {
        eventually_reads(
            "each gateway to know the sale",
            Duration::from_secs(5),
            || flag_of(&p, url, &sku),
            |flag| *flag == Some(false),
        )
        .await;
    }
    let (mut worst_set, mut worst_clear) = (Duration::ZERO, Duration::ZERO);
    for round in 0..5 {
        let request = one_unit(&p, &sku, round);
        let since = Instant::now();
        let reserved = p
            .stores
            .stock
            .reserve(&request, clock::now_ms(), u64::MAX)
            .await
            .map(|answered| answered.outcome);
        assert!(
            matches!(reserved, Ok(ReserveOutcome::Reserved { .. })),
            "{reserved:?}"
        );
        worst_set = worst_set.max(until_all_show(&p, &sku, true, since).await);
        for url in &p.gateway_urls {
            let answer = p
                .post_purchase(url, sku.as_str(), "late", None)
                .await
                .unwrap();
            assert_eq!((answer.status, answer.kind()), (409, "sold-out"));
        }

        let since = Instant::now();
        p.stores
            .stock
            .release(
                &sku,
                request.request_id,
                "payment_declined",
                clock::now_ms(),
            )
            .await
            .unwrap();
        worst_clear = worst_clear.max(until_all_show(&p, &sku, false, since).await);
    }
    println!("worst of 5 rounds on 2 gateways: set {worst_set:?}, cleared {worst_clear:?}");
    assert!(
        worst_set <= Duration::from_millis(100),
        "set after {worst_set:?}"
    );
    assert!(
        worst_clear <= Duration::from_millis(100),
        "cleared after {worst_clear:?}"
    );
    p.stop().await;
}

/// A Redis restart drops the subscription: the gateway resubscribes, and
/// follows flips again within 100 ms. A flip whose message was lost (here:
/// the flag written without publishing) is caught by the periodic reread.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_flag_follows_redis_through_a_restart_and_a_lost_message() {
    let p = Pipeline::start(PipelineOptions {
        shop_workers: 0,
        order_workers: 0,
        own_redis: true,
        env: vec![("FLASHSALE_GATEWAY_FLAG_REFRESH_MS", "200".into())],
        ..Default::default()
    })
    .await
    .expect("pipeline starts");
    let url = p.gateway_url.clone();
    let sku = p.sku("restart");
    one_unit_sale(&p, &sku).await;
    eventually_reads(
        "the gateway to know the sale",
        Duration::from_secs(5),
        || flag_of(&p, &url, &sku),
        |flag| *flag == Some(false),
    )
    .await;

    p.redis
        .as_ref()
        .expect("own Redis")
        .restart()
        .await
        .unwrap();
    eventually(
        "the gateway to resubscribe",
        Duration::from_secs(10),
        || async {
            let subscribed = p.metric(&url, "gateway_flags_subscribed").await == 1.0;
            let messages_heard_again = p.metric(&url, "gateway_flag_rereads_total").await > 0.0;
            (subscribed && messages_heard_again).then_some(())
        },
    )
    .await;
    // The store's connection reconnects on its own; the first call may
    // still meet the dropped one.
    let request = one_unit(&p, &sku, 0);
    eventually(
        "the reservation after the restart",
        Duration::from_secs(10),
        || async {
            p.stores
                .stock
                .reserve(&request, clock::now_ms(), u64::MAX)
                .await
                .ok()
        },
    )
    .await;
    let since = Instant::now();
    while flag_of(&p, &url, &sku).await != Some(true) {
        assert!(
            since.elapsed() < Duration::from_secs(1),
            "the line not full after 1 s"
        );
    }
    assert!(
        since.elapsed() <= Duration::from_millis(100),
        "after the restart: set after {:?}",
        since.elapsed()
    );

    // A flip nobody announced: only a reread can find it.
    let mut conn = redis::Client::open(p.redis.as_ref().unwrap().url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("HSET")
        .arg(SkuKeys::new(&sku).stock())
        .arg("line_full")
        .arg("0")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    eventually_reads(
        "the reread to clear the flag",
        Duration::from_secs(3),
        || flag_of(&p, &url, &sku),
        |flag| *flag == Some(false),
    )
    .await;
    p.stop().await;
}
