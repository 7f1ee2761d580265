//! The stock model through the whole pipeline: reservations that expire,
//! restock and close, the sale window, and losing Redis mid-surge.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure here is the test's answer

use std::time::Duration;

use flashsale_testkit::flashsale_cli::sale;
use flashsale_testkit::flashsale_core::dynamo::orders::OrderStatus;
use flashsale_testkit::flashsale_core::ids::{RequestId, Sku};
use flashsale_testkit::flashsale_core::status::PurchaseStatus;
use flashsale_testkit::flashsale_core::stock::SaleRules;
use flashsale_testkit::flashsale_core::stock::SkuKeys;
use flashsale_testkit::flashsale_core::{bus::kafka, clock};
use flashsale_testkit::{Pipeline, PipelineOptions, eventually, eventually_reads};
use serde_json::json;

const SETTLE: Duration = Duration::from_secs(60);

async fn accepted(p: &Pipeline, sku: &str, user: &str) -> String {
    let (status, body) = p.buy(sku, user, None).await;
    assert_eq!(status, 202, "{body}");
    body["request_id"]
        .as_str()
        .expect("a request id")
        .to_owned()
}

/// A charge slower than the reservation's TTL: the sweep gives the unit
/// back and tells the buyer; the order-worker's commit is then refused, it
/// refunds the charge and cancels the order; the unit sells again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reservation_that_outlives_its_ttl_is_swept_refunded_and_resold() {
    // The charge must start before the deadline and finish after it: a
    // TTL well above the time to reach the charge on a loaded machine, a
    // payment slower than the TTL, and a client that waits for it.
    let p = Pipeline::start(PipelineOptions {
        env: vec![("FLASHSALE_PAYMENT_TIMEOUT_MS", "10000".into())],
        ..PipelineOptions::default()
    })
    .await
    .expect("pipeline starts");
    let sku = p.sku("ttl");
    let mut spec = Pipeline::spec(&sku, 1, 1);
    spec.reservation_ttl = Duration::from_millis(2_000);
    p.create_sale_with(&spec).await.unwrap();
    p.set_payment(0.0, 4_000).await.unwrap();

    let slow = accepted(&p, sku.as_str(), "slow-payer").await;
    let swept = p.terminal(&slow).await;
    assert_eq!(swept.status.as_str(), "cancelled", "{swept:?}");
    assert_eq!(swept.reason.as_deref(), Some("reservation_expired"));
    let levels = p.stores.stock.levels(&sku).await.unwrap().unwrap();
    assert_eq!((levels.available, levels.reserved, levels.sold), (1, 0, 0));

    // The charge went through after the deadline: refunded, order cancelled.
    let id = RequestId::parse(&slow).unwrap();
    let order = eventually("the late-paid order cancelled", SETTLE, || async {
        let order = p.stores.orders.get(id).await.ok()??;
        (order.status == OrderStatus::Cancelled).then_some(order)
    })
    .await;
    assert_eq!(order.reason.as_deref(), Some("reservation_expired"));
    let charge_id = order.payment_id.expect("the late charge is on the order");
    let charges = p
        .stores
        .payment
        .charges_of_sale(&levels.sale_id)
        .await
        .unwrap();
    let charge = charges.iter().find(|c| c.id == charge_id).expect("charge");
    assert!(charge.refunded, "{charge:?}");

    p.set_payment(0.0, 5).await.unwrap();
    let next = accepted(&p, sku.as_str(), "next-buyer").await;
    assert_eq!(p.terminal(&next).await.status.as_str(), "confirmed");
    let report = eventually("a clean audit at rest", SETTLE, || async {
        let report = p.stores.audit(&sku, true).await.ok()?;
        report.ok().then_some(report)
    })
    .await;
    assert_eq!(
        (
            report.sold,
            report.confirmed_orders,
            report.cancelled_orders
        ),
        (1, 1, 1)
    );
    p.stop().await;
}

/// Restock reopens a sold-out sale (the flag clears, new units sell);
/// the same restock retried adds nothing; the gateway refuses a closed sale
/// with `409 sale-not-active` and queues nothing; a buyer who comes before
/// the opening waits in the line.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restock_reopens_a_sold_out_sale_and_close_or_the_window_rejects() {
    let p = Pipeline::start(PipelineOptions::default())
        .await
        .expect("pipeline starts");
    let sku = p.sku("restock");
    p.create_sale(&sku, 1, 1).await.unwrap();
    let first = accepted(&p, sku.as_str(), "ann").await;
    assert_eq!(p.terminal(&first).await.status.as_str(), "confirmed");
    let (status, body) = p.buy(sku.as_str(), "ben", None).await;
    assert_eq!(status, 409, "sold out at the gateway: {body}");

    let restocked = sale::restock(&p.stores, &sku, 2, "restock-1")
        .await
        .unwrap();
    assert_eq!((restocked.total, restocked.available), (3, 2));
    let again = sale::restock(&p.stores, &sku, 2, "restock-1")
        .await
        .unwrap();
    assert_eq!(again, restocked, "a retried restock adds nothing");
    let inventory = p.stores.inventory.get(&sku).await.unwrap().unwrap();
    assert_eq!(
        inventory.rules.total, 3,
        "DynamoDB counted the restock once"
    );
    let levels = p.stores.stock.levels(&sku).await.unwrap().unwrap();
    assert!(!levels.sold_out);
    for user in ["ben", "cat"] {
        let id = accepted(&p, sku.as_str(), user).await;
        assert_eq!(p.terminal(&id).await.status.as_str(), "confirmed");
    }
    assert_eq!(p.buy(sku.as_str(), "dan", None).await.0, 409);

    sale::restock(&p.stores, &sku, 5, "restock-2")
        .await
        .unwrap();
    sale::close(&p.stores, &sku).await.unwrap();
    let records = p.records_in(&p.purchase_topic()).await.unwrap();
    let (status, body) = p.buy(sku.as_str(), "eve", None).await;
    assert_eq!(
        (status, body["type"].as_str()),
        (409, Some("sale-not-active")),
        "{body}"
    );
    assert_eq!(
        p.records_in(&p.purchase_topic()).await.unwrap(),
        records,
        "refused purchases never reach Kafka"
    );
    let view = sale::show(&p.stores, &sku).await.unwrap().unwrap();
    assert!(view.closed && view.redis.as_ref().is_some_and(|r| r.closed));
    let report = p.stores.audit(&sku, true).await.unwrap();
    assert!(report.ok(), "{:?}", report.violations);
    assert_eq!((report.total, report.sold), (8, 3));

    // Before the opening a buyer takes a place in the line: accepted, and
    // waiting (not reserved) until the sale opens.
    let later = p.sku("later");
    let mut spec = Pipeline::spec(&later, 5, 1);
    spec.starts_in = Duration::from_secs(3600);
    p.create_sale_with(&spec).await.unwrap();
    let early = accepted(&p, later.as_str(), "fay").await;
    let waiting = eventually(
        "the early buyer in line",
        Duration::from_secs(30),
        || async {
            p.status_of(&early, 0)
                .await
                .filter(|s| s.status.as_str() == "waiting")
        },
    )
    .await;
    assert_eq!(waiting.queue_position, Some(1), "{waiting:?}");
    let levels = p.stores.stock.levels(&later).await.unwrap().unwrap();
    assert_eq!(
        (levels.available, levels.reserved),
        (5, 0),
        "nothing reserved before the opening"
    );

    // The line lost while the status board kept the buyer `waiting` (a
    // Redis replaced between the shop-worker's join and its post, or the
    // line's node of a cluster lost): asking takes the buyer back into
    // the line instead of leaving them waiting for an answer that never
    // comes.
    let mut redis = redis::Client::open(p.cli.redis.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys = SkuKeys::new(&later);
    let removed: i64 = redis::cmd("DEL")
        .arg(keys.line())
        .arg(keys.line_who())
        .arg(keys.line_seen())
        .arg(keys.admitted_ever())
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(removed >= 2, "the line's keys existed");
    let back = eventually(
        "the buyer back in the lost line",
        Duration::from_secs(30),
        || async {
            p.status_of(&early, 0)
                .await
                .filter(|s| s.queue_position.is_some())
        },
    )
    .await;
    assert_eq!(
        (back.status.as_str(), back.queue_position),
        ("waiting", Some(1)),
        "{back:?}"
    );
    p.stop().await;
}

#[derive(Debug)]
enum Outcome {
    /// 409 at the gateway: sold out, never queued.
    Shed,
    Settled(PurchaseStatus),
}

/// A buyer as a well-behaved client: retries with the same Idempotency-Key
/// while the gateway cannot answer (503, or the sku unknown while Redis is
/// being recovered), and asks again with it when the purchase's status was
/// lost with Redis.
async fn persistent_buyer(p: &Pipeline, sku: &str, user: &str) -> Outcome {
    // Request ids derive from (user, key): unique per run, or DynamoDB's
    // and Redis's memory of earlier runs would answer for this one.
    let key = format!("{}-{user}", p.prefix);
    let until = tokio::time::Instant::now() + Duration::from_secs(150);
    'purchase: loop {
        assert!(tokio::time::Instant::now() < until, "{user} never settled");
        let (status, body) = match p.try_buy(sku, user, Some(&key)).await {
            Ok(answer) => answer,
            Err(error) => (0, json!({ "error": error.to_string() })),
        };
        let id = match status {
            202 => body["request_id"].as_str().expect("request id").to_owned(),
            409 if body["type"] == "sold-out" => return Outcome::Shed,
            // Unreachable, unknown while Redis is lost, the queue window
            // full, rate limited, or the same key still in progress.
            0 | 404 | 409 | 429 | 500..=599 => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            other => panic!("{user}: unexpected {other}: {body}"),
        };
        let mut last = None;
        loop {
            assert!(
                tokio::time::Instant::now() < until,
                "{user} ({id}) never settled; last seen {last:?}"
            );
            match p.status_of(&id, 2).await {
                Some(s) if s.status.is_terminal() => return Outcome::Settled(s),
                Some(s) => last = Some(s),
                // Forgotten (Redis lost) or Redis unreachable: ask again.
                None => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue 'purchase;
                }
            }
        }
    }
}

/// Redis is killed with SIGKILL while buyers arrive, its data deleted, an
/// empty Redis started, and `flashsale recover` rebuilds the sku from
/// DynamoDB and the reservations topic. The sale then finishes: every
/// buyer settles, nothing is oversold, and the audit is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_lost_mid_surge_is_recovered_and_the_sale_finishes_clean() {
    let p = std::sync::Arc::new(
        Pipeline::start(PipelineOptions {
            decline_rate: 0.2,
            payment_latency_ms: 20,
            own_redis: true,
            ..PipelineOptions::default()
        })
        .await
        .expect("pipeline starts"),
    );
    let sku = p.sku("lost");
    let total = 150;
    p.create_sale(&sku, total, 1).await.unwrap();

    let buyers = 500;
    let mut crowd = Vec::new();
    let mut killed = false;
    for n in 0..buyers {
        let (pipeline, sku_name) = (p.clone(), sku.to_string());
        crowd.push(tokio::spawn(async move {
            persistent_buyer(&pipeline, &sku_name, &format!("buyer-{n}")).await
        }));
        // A few hundred arrivals a second: the loss lands mid-surge.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let levels = p.stores.stock.levels(&sku).await.unwrap().unwrap();
        // Lose Redis once some units are sold and others are in flight.
        if !killed && n >= buyers / 3 && levels.sold >= 20 && levels.reserved > 0 {
            killed = true;
            let own = p.redis.as_ref().expect("own redis");
            own.kill().unwrap();
            own.wipe_and_restart().await.unwrap();
            eprintln!("Redis killed and wiped at {levels:?}");
            // The client reconnects on its first failed command.
            let empty = eventually("the empty Redis", SETTLE, || async {
                p.stores.stock.status(&sku, 0).await.ok()
            })
            .await;
            assert!(empty.is_none(), "the new Redis is empty");
            let recovered = eventually("a recovery", SETTLE, || async {
                match p.stores.recover(&p.cli, &sku, false).await {
                    Ok(recovered) => Some(recovered),
                    Err(error) => {
                        eprintln!("recover: {error}");
                        None
                    }
                }
            })
            .await;
            eprintln!("recovered: {recovered:?}");
            assert!(recovered.from_orders + recovered.from_topic > 0);
        }
    }
    assert!(killed, "the surge ended before Redis could be lost mid-way");
    let (mut shed, mut confirmed, mut other) = (0, 0, 0);
    let mut seen: std::collections::BTreeMap<String, usize> = Default::default();
    let mut settled = Vec::new();
    for buyer in crowd {
        match buyer.await.expect("a buyer panicked") {
            Outcome::Shed => shed += 1,
            Outcome::Settled(s) => {
                if s.status.as_str() == "confirmed" {
                    confirmed += 1;
                } else {
                    other += 1;
                }
                *seen
                    .entry(format!("{} {:?}", s.status.as_str(), s.reason))
                    .or_default() += 1;
                settled.push(s);
            }
        }
    }
    let mut disagree: std::collections::BTreeMap<String, usize> = Default::default();
    for s in &settled {
        let order = p.order(&s.request_id).await;
        let stored = order.map(|o| o.status.as_str()).unwrap_or("no order");
        *disagree
            .entry(format!("saw {} / order {stored}", s.status.as_str()))
            .or_default() += 1;
    }
    eprintln!("seen: {seen:?}\nagainst orders: {disagree:?}");
    // What each buyer was told is what the order stage recorded.
    for (pair, count) in &disagree {
        assert!(
            [
                "saw confirmed / order CONFIRMED",
                "saw cancelled / order CANCELLED",
                "saw rejected / order no order"
            ]
            .contains(&pair.as_str()),
            "{count} buyers: {pair}"
        );
    }
    let report = eventually("a clean audit at rest", SETTLE, || async {
        let report = p.stores.audit(&sku, true).await.ok()?;
        report.ok().then_some(report)
    })
    .await;
    eprintln!(
        "buyers: {confirmed} confirmed, {other} rejected or cancelled, {shed} shed; {report:?}"
    );
    assert!(report.sold <= total as i64, "OVERSOLD: {report:?}");
    assert_eq!(report.sold as usize, report.confirmed_orders);
    assert!(
        confirmed <= report.confirmed_orders,
        "{confirmed} buyers saw confirmed but only {} orders are",
        report.confirmed_orders
    );
    // Every unit is accounted for (declines late in the sale leave some
    // available once the queue has drained: that is not a loss).
    assert_eq!(report.sold + report.available, total as i64, "{report:?}");
    assert!(report.sold > 0 && report.cancelled_orders > 0, "{report:?}");
}

/// A sale nobody could buy from, or that would sell for nothing, is
/// refused at `sale create` with a message naming what is wrong, and
/// nothing of it is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sale_that_cannot_be_sold_is_refused_at_create() {
    let p = Pipeline::gateways_only().await;
    let sku = p.sku("invalid");
    type Spoil = fn(&mut sale::SaleSpec);
    let cases: [(&str, Spoil); 6] = [
        ("price", |s| s.price_cents = 0),
        ("per-user limit", |s| s.per_user_limit = 0),
        ("reservation TTL", |s| {
            s.reservation_ttl = Duration::from_millis(500)
        }),
        ("duration", |s| s.duration = Duration::ZERO),
        ("overbook", |s| s.overbook = f64::NAN),
        // What `flashsale sale create` refused before the library did.
        ("overbook", |s| s.overbook = 101.0),
    ];
    for (what, spoil) in cases {
        let mut spec = Pipeline::spec(&sku, 5, 1);
        spoil(&mut spec);
        let refused = p
            .create_sale_with(&spec)
            .await
            .expect_err(&format!("a sale with a bad {what} is refused"));
        assert!(
            refused.to_string().contains(what),
            "the message names the {what}: {refused}"
        );
        assert!(
            sale::show(&p.stores, &sku).await.unwrap().is_none(),
            "nothing stored for a bad {what}"
        );
    }
    p.create_sale_with(&Pipeline::spec(&sku, 5, 1))
        .await
        .expect("a good sale is created");
    p.stop().await;
}

/// A pipeline with a Redis of its own and no order-worker, and a sale of
/// `units` whose reservations last 2 s.
async fn unpaid_sale_on_own_redis(name: &str, units: u64) -> (Pipeline, Sku, SaleRules) {
    let p = Pipeline::start(PipelineOptions {
        order_workers: 0,
        own_redis: true,
        ..PipelineOptions::default()
    })
    .await
    .expect("pipeline starts");
    let sku = p.sku(name);
    let mut spec = Pipeline::spec(&sku, units, 1);
    spec.reservation_ttl = Duration::from_secs(2);
    let rules = p.create_sale_with(&spec).await.unwrap();
    (p, sku, rules)
}

/// Redis refuses every write for a while (out of memory under
/// `noeviction`) while reservations pass their deadline: the shop-worker
/// says it is not ready, and why, while its sweep cannot finish a round;
/// once Redis takes writes again the sweep gives every unit back and tells
/// every buyer, and the audit is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sweep_outlives_a_redis_that_refuses_writes() {
    // Nobody pays: every reservation waits for the sweep.
    let (p, sku, _) = unpaid_sale_on_own_redis("oom", 5).await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(accepted(&p, sku.as_str(), &format!("oom-{n}")).await);
    }
    eventually("five reservations", SETTLE, || async {
        let levels = p.stores.stock.levels(&sku).await.ok()??;
        (levels.reserved == 5).then_some(())
    })
    .await;

    let redis = own_redis_admin(&p).await;
    redis_config(&redis, "maxmemory-policy", "noeviction").await;
    redis_config(&redis, "maxmemory", "1").await;
    let shop = p.worker_metrics[0].clone();
    let readiness = || async {
        let response = p.http.get(format!("{shop}/readyz")).send().await.ok()?;
        Some((response.status().as_u16(), response.text().await.ok()?))
    };
    let (_, why) = eventually("the shop-worker not ready", SETTLE, || async {
        readiness()
            .await
            .filter(|(status, body)| *status == 503 && body.contains("sweep"))
    })
    .await;
    eprintln!("not ready while Redis refuses writes: {why}");

    redis_config(&redis, "maxmemory", "0").await;
    eventually("every unit given back", SETTLE, || async {
        let levels = p.stores.stock.levels(&sku).await.ok()??;
        (levels.reserved == 0 && levels.available == 5).then_some(())
    })
    .await;
    for id in &ids {
        let told = p.terminal(id).await;
        assert_eq!(
            (told.status.as_str(), told.reason.as_deref()),
            ("cancelled", Some("reservation_expired")),
            "{told:?}"
        );
    }
    eventually("ready again", SETTLE, || async {
        readiness().await.filter(|(status, _)| *status == 200)
    })
    .await;
    let report = p.stores.audit(&sku, true).await.unwrap();
    assert!(report.ok(), "{:?}", report.violations);
    p.stop().await;
}

/// Redis refuses every write for longer than a reservation may retry
/// (`FLASHSALE_RETRY_DEADLINE_MS`): the shop-worker parks each purchase it
/// cannot reserve at the tail of the topic and its partition moves on,
/// instead of holding every purchase behind the first; once Redis takes
/// writes again the parked copies are reserved, and every purchase is
/// confirmed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn purchases_redis_keeps_refusing_are_parked_and_their_partition_moves_on() {
    let p = Pipeline::start(PipelineOptions {
        own_redis: true,
        env: vec![("FLASHSALE_RETRY_DEADLINE_MS", "1500".into())],
        ..PipelineOptions::default()
    })
    .await
    .expect("pipeline starts");
    let sku = p.sku("parked");
    p.create_sale(&sku, 3, 1).await.unwrap();
    let redis = own_redis_admin(&p).await;
    redis_config(&redis, "maxmemory-policy", "noeviction").await;
    redis_config(&redis, "maxmemory", "1").await;

    let producer = p.producer().expect("a producer");
    let mut ids = Vec::new();
    for n in 0..3 {
        let user = format!("{}-parked-{n}", p.prefix);
        ids.push(produce_purchase(&p, &producer, &sku, &user, clock::now_ms()).await);
    }
    eventually(
        "the shop-worker committed past the three, Redis still refusing",
        SETTLE,
        || async {
            let committed = p
                .committed("flashsale-shop", &p.purchase_topic())
                .await
                .ok()?;
            (committed >= 3).then_some(())
        },
    )
    .await;
    let parked = p
        .metric(
            &p.worker_metrics[0],
            &format!("shop_parked_total{{topic=\"{}\"}}", p.purchase_topic()),
        )
        .await;
    assert!(parked >= 3.0, "{parked} parked");

    redis_config(&redis, "maxmemory", "0").await;
    for id in &ids {
        let told = p.terminal(id).await;
        assert_eq!(told.status.as_str(), "confirmed", "{told:?}");
    }
    let by_status = p.money_adds_up(&sku).await;
    assert_eq!(by_status.get(&OrderStatus::Confirmed), Some(&3));
    p.stop().await;
}

/// One sku's stock lost (its keys gone, as with the node of a cluster that
/// held them) while purchases of it and of another sku arrive: the other
/// sku keeps selling; the lost sku's purchases wait, in arrival order, for
/// its recovery and are then served, and one that outwaits the queue
/// cutoff first is rejected `stale`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_sku_waits_for_its_recovery_while_the_others_keep_selling() {
    // Long enough that the waiting purchases outlast everything this test
    // waits for before the recovery, however slowly the other sku's sagas
    // run; with 20 s they went stale before it on a loaded machine.
    const CUTOFF_MS: u64 = 120_000;
    let p = Pipeline::start(PipelineOptions {
        env: vec![("FLASHSALE_MAX_QUEUE_AGE_MS", CUTOFF_MS.to_string())],
        ..PipelineOptions::default()
    })
    .await
    .expect("pipeline starts");
    let (lost, other) = (p.sku("lost"), p.sku("other"));
    p.create_sale(&lost, 5, 1).await.unwrap();
    p.create_sale(&other, 5, 1).await.unwrap();
    p.stores
        .stock
        .unload(&lost)
        .await
        .expect("the sku's stock is gone");

    let producer = p.producer().expect("a producer");
    let send = |sku: Sku, user: String, accepted_at_ms: u64| {
        let (p, producer) = (&p, &producer);
        async move { produce_purchase(p, producer, &sku, &user, accepted_at_ms).await }
    };
    let user = |name: &str| format!("{}-{name}", p.prefix);
    // Accepted a second short of the cutoff: it outwaits it before any
    // recovery.
    let old = send(
        lost.clone(),
        user("old"),
        clock::now_ms() - (CUTOFF_MS - 1_000),
    )
    .await;
    let mut waiting = Vec::new();
    for n in 0..3 {
        waiting.push(send(lost.clone(), user(&format!("w{n}")), clock::now_ms()).await);
    }
    let mut others = Vec::new();
    for n in 0..3 {
        others.push(send(other.clone(), user(&format!("o{n}")), clock::now_ms()).await);
    }

    let told = p.terminal(&old).await;
    assert_eq!(
        (told.status.as_str(), told.reason.as_deref()),
        ("rejected", Some("stale")),
        "{told:?}"
    );
    let shop = p.worker_metrics[0].clone();
    eventually_reads(
        "three purchases waiting for the lost sku",
        SETTLE,
        || p.metric(&shop, "shop_purchases_awaiting_stock"),
        |waiting| *waiting == 3.0,
    )
    .await;
    // Sold while the lost sku's purchases wait.
    for id in &others {
        let told = p.terminal(id).await;
        assert_eq!(told.status.as_str(), "confirmed", "{told:?}");
    }
    for id in &waiting {
        let status = p.status_of(id, 0).await;
        assert!(
            status.as_ref().is_none_or(|s| !s.status.is_terminal()),
            "decided before its sku was recovered: {status:?}"
        );
    }

    p.stores
        .recover(&p.cli, &lost, false)
        .await
        .expect("the sku is recovered");
    let mut served_at = Vec::new();
    for id in &waiting {
        let told = p.terminal(id).await;
        assert_eq!(told.status.as_str(), "confirmed", "{told:?}");
        // Reserved when its deadline was set: one TTL before it.
        served_at.push(p.order(id).await.expect("an order").expires_at_ms);
    }
    assert!(
        served_at.is_sorted(),
        "served out of arrival order: {served_at:?}"
    );
    for sku in [&lost, &other] {
        let by_status = p.money_adds_up(sku).await;
        assert_eq!(by_status.get(&OrderStatus::Confirmed), Some(&3));
    }
    assert_eq!(p.metric(&shop, "shop_purchases_awaiting_stock").await, 0.0);
    p.stop().await;
}

/// `flashsale recover --force` rebuilds a sku Redis still holds: workers
/// still consuming would reserve and commit beside the rebuild, counted by
/// neither. It refuses while the groups have live members, naming them,
/// and runs once they have stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forced_recovery_refuses_while_workers_consume_and_names_them() {
    use flashsale_testkit::flashsale_cli::recover::RecoveryError;

    let p = Pipeline::gateways_only().await;
    let sku = p.sku("forced");
    p.create_sale(&sku, 5, 1).await.unwrap();
    let shop = p.add_shop_worker().await.expect("a shop-worker");
    let order = p.add_order_worker().await.expect("an order-worker");

    let (members, said) = eventually("refused, naming both workers", SETTLE, || async {
        match p.stores.recover(&p.cli, &sku, true).await {
            Err(error @ RecoveryError::LiveMembers { .. }) => {
                let said = error.to_string();
                let RecoveryError::LiveMembers { members, .. } = error else {
                    return None;
                };
                (members.len() == 2).then_some((members, said))
            }
            other => {
                eprintln!("not refused: {other:?}");
                None
            }
        }
    })
    .await;
    let services: Vec<&str> = members.iter().map(|m| m.service.as_str()).collect();
    assert_eq!(services, ["shop-worker", "order-worker"]);
    assert!(said.contains("pid"), "{said}");
    assert!(
        p.stores.stock.levels(&sku).await.unwrap().is_some(),
        "left as it was"
    );

    shop.stop().await.expect("the shop-worker stops");
    order.stop().await.expect("the order-worker stops");
    let recovered = p
        .stores
        .recover(&p.cli, &sku, true)
        .await
        .expect("recovered once nobody consumes");
    assert_eq!(recovered.levels.available, 5);
    p.stop().await;
}

/// Puts a purchase request of one unit straight on the purchase topic, as
/// a gateway would after admitting it; its request id.
async fn produce_purchase(
    p: &Pipeline,
    producer: &rdkafka::producer::FutureProducer,
    sku: &Sku,
    user: &str,
    accepted_at_ms: u64,
) -> String {
    use flashsale_testkit::flashsale_core::bus::messages::{self, PurchaseRequest};
    use flashsale_testkit::flashsale_core::ids::{Quantity, UserId};
    let request = PurchaseRequest::new(
        RequestId::fresh(),
        sku.clone(),
        UserId::parse(user).unwrap(),
        Quantity::new(1).unwrap(),
        accepted_at_ms,
    );
    kafka::send(
        producer,
        &p.purchase_topic(),
        sku.as_str(),
        &messages::encode(&request),
        kafka::trace_headers(request.request_id),
        Duration::from_secs(5),
    )
    .await
    .expect("produced");
    request.request_id.to_string()
}

/// An admin connection to the pipeline's own Redis.
async fn own_redis_admin(p: &Pipeline) -> redis::aio::MultiplexedConnection {
    redis::Client::open(p.redis.as_ref().expect("own redis").url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn redis_config(redis: &redis::aio::MultiplexedConnection, name: &str, value: &str) {
    redis::cmd("CONFIG")
        .arg("SET")
        .arg(name)
        .arg(value)
        .query_async::<()>(&mut redis.clone())
        .await
        .expect("CONFIG SET")
}

/// A unit reserved, expired and sold again, then Redis lost before the
/// order stage saw the first reservation: recovery counts the expired
/// reservation as given back (not as held, which read as oversold and
/// refused), the counts equal the orders, and the sale goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_unit_expired_and_sold_again_is_recovered_as_sold_once() {
    use flashsale_testkit::flashsale_core::bus::messages::{self, Reservation};
    use flashsale_testkit::flashsale_core::bus::topic_reader;
    use flashsale_testkit::flashsale_core::dynamo::orders::Order;
    use flashsale_testkit::flashsale_core::payment::{
        ChargeMetadata, ChargeOutcome, ChargeRequest,
    };
    use rdkafka::message::Message;

    // The order stage is behind: it has seen neither reservation.
    let (p, sku, rules) = unpaid_sale_on_own_redis("resold", 1).await;
    let first = accepted(&p, sku.as_str(), "ann").await;
    let expired = p.terminal(&first).await;
    assert_eq!(
        expired.reason.as_deref(),
        Some("reservation_expired"),
        "{expired:?}"
    );
    let second = accepted(&p, sku.as_str(), "bob").await;
    eventually("the unit reserved again", SETTLE, || async {
        p.status_of(&second, 1)
            .await
            .filter(|s| s.status.as_str() == "reserved")
    })
    .await;

    // The second buyer's saga, as an order-worker runs it: order, charge,
    // commit, confirm. (A worker here would also settle the first.)
    let topic = p.topic(kafka::topic::RESERVATIONS);
    let ranges = topic_reader::watermarks(&p.kafka, &topic).await.unwrap();
    let records = topic_reader::read(&p.kafka, &topic, ranges, Duration::from_secs(30))
        .await
        .unwrap();
    let reservation: Reservation = records
        .iter()
        .filter_map(|m| messages::decode::<Reservation>(m.payload()).ok())
        .find(|r| r.request_id.to_string() == second)
        .expect("bob's reservation");
    let order = Order::pending(&reservation, clock::now_ms());
    p.stores.orders.create(&order).await.unwrap();
    let request = ChargeRequest {
        amount_cents: order.amount_cents,
        currency: "EUR".into(),
        metadata: ChargeMetadata {
            order_id: second.clone(),
            sku: sku.to_string(),
            sale_id: rules.sale_id.clone(),
        },
    };
    let ChargeOutcome::Succeeded(charge) = p
        .stores
        .payment
        .charge(order.order_id, &request)
        .await
        .unwrap()
    else {
        panic!("the charge was declined");
    };
    p.stores
        .stock
        .commit(&sku, order.order_id, clock::now_ms())
        .await
        .unwrap();
    p.stores
        .orders
        .confirm(&order, &charge, clock::now_ms())
        .await
        .unwrap();

    // Redis lost: killed, its data gone, started empty.
    let own = p.redis.as_ref().expect("own redis");
    own.kill().unwrap();
    own.wipe_and_restart().await.unwrap();
    let recovered = eventually("a recovery", SETTLE, || async {
        match p.stores.recover(&p.cli, &sku, false).await {
            Ok(recovered) => Some(Ok(recovered)),
            Err(error) if error.to_string().contains("exceed the total") => Some(Err(error)),
            Err(error) => {
                eprintln!("recover: {error}");
                None
            }
        }
    })
    .await
    .expect("recovered, not refused as oversold");
    let levels = &recovered.levels;
    assert_eq!(
        (levels.available, levels.reserved, levels.sold),
        (0, 0, 1),
        "{recovered:?}"
    );

    // The order stage catches up, and the sale goes on.
    let _orders = p.add_order_worker().await.unwrap();
    sale::restock(&p.stores, &sku, 1, "resold-1").await.unwrap();
    // The gateway hears of the restocked unit (its flags follow Redis).
    eventually("the gateway sees the unit", SETTLE, || async {
        let view = p.sku_view(&p.gateway_url, &sku).await?;
        (view["gateway"]["line_full"] == false).then_some(())
    })
    .await;
    let third = accepted(&p, sku.as_str(), "cyd").await;
    assert_eq!(p.terminal(&third).await.status.as_str(), "confirmed");
    // The order stage settles the first purchase in its own time (its
    // saga runs beside the third's): at rest means after it.
    eventually("the first purchase's order settled", SETTLE, || async {
        p.order(&first)
            .await
            .filter(|o| o.status != OrderStatus::Pending)
    })
    .await;
    let by_status = p.money_adds_up(&sku).await;
    assert_eq!(
        (
            by_status.get(&OrderStatus::Confirmed).copied(),
            by_status.get(&OrderStatus::Cancelled).copied()
        ),
        (Some(2), Some(1)),
        "{by_status:?}"
    );
    p.stop().await;
}
