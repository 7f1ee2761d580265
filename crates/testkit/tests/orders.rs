//! The order saga against the payment stub behaving like a real processor:
//! declines, errors, ambiguous timeouts and an outage. Whatever happens, a
//! purchase ends once, no buyer is charged twice, and a charge is kept only
//! on a confirmed order.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure here is the test's answer

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use flashsale_testkit::flashsale_cli::order;
use flashsale_testkit::flashsale_core::bus::consumer::SESSION_TIMEOUT;
use flashsale_testkit::flashsale_core::dynamo::orders::OrderStatus;
use flashsale_testkit::flashsale_core::ids::RequestId;
use flashsale_testkit::flashsale_core::payment::{ChargeStatus, LatencyModel, StubBehaviour};
use flashsale_testkit::flashsale_core::status::PurchaseStatus;
use flashsale_testkit::{Pipeline, PipelineOptions, ServiceProcess, eventually, eventually_reads};

/// Buyers `0..n` each buy one unit of `sku`; the purchases' terminal states.
async fn buy_all(p: &Arc<Pipeline>, sku: &str, n: usize) -> Vec<PurchaseStatus> {
    let gate = Arc::new(tokio::sync::Semaphore::new(32));
    let buyers: Vec<_> = (0..n)
        .map(|i| {
            let (p, gate, sku) = (p.clone(), gate.clone(), sku.to_owned());
            tokio::spawn(async move {
                let id = {
                    let _slot = gate.acquire().await.expect("gate");
                    let user = format!("{}-o{i}", p.prefix);
                    let (status, body) = p.buy(&sku, &user, Some(&user)).await;
                    assert_eq!(status, 202, "{body}");
                    body["request_id"].as_str().expect("request id").to_owned()
                };
                p.terminal(&id).await
            })
        })
        .collect();
    let mut settled = Vec::new();
    for buyer in buyers {
        settled.push(buyer.await.expect("buyer"));
    }
    settled
}

/// Every saga runs twice at once, as when a partition is taken over from a
/// worker that was only slow: a second order-worker reads the same
/// reservations in a group of its own, with its clock 3 s ahead, so that it
/// judges reservations (4 s long) expired while the other run is still
/// being charged (1.5 s). Whichever of the commit and the withdrawal
/// reaches Redis first decides: every purchase ends once, and a charge is
/// kept exactly on the confirmed orders.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_runs_of_each_purchase_at_once_with_skewed_clocks_end_once() {
    let p = Arc::new(
        Pipeline::start(PipelineOptions {
            decline_rate: 0.2,
            payment_latency_ms: 1500,
            ..PipelineOptions::default()
        })
        .await
        .expect("pipeline starts"),
    );
    let twin_group = p.kafka.group("twin-orders");
    let _twin = p
        .add_order_worker_with(&[
            ("FLASHSALE_ORDER_GROUP", twin_group.clone()),
            ("FLASHSALE_ORDER_CLOCK_OFFSET_MS", "3000".into()),
        ])
        .await
        .expect("the twin order-worker starts");
    let sku = p.sku("twice");
    let mut spec = Pipeline::spec(&sku, 30, 1);
    spec.reservation_ttl = Duration::from_secs(4);
    p.create_sale_with(&spec).await.unwrap();

    let settled = buy_all(&p, sku.as_str(), 30).await;
    // Both runs of every saga have finished: both groups are at the end.
    let reservations = p.topic("reservations");
    let records = p.records_in(&reservations).await.unwrap();
    assert_eq!(records, 30, "every purchase was reserved once");
    eventually(
        "both runs of every saga done",
        SESSION_TIMEOUT * 6,
        || async {
            let main = p.committed("flashsale-orders", &reservations).await.ok()?;
            let twin = p.committed("twin-orders", &reservations).await.ok()?;
            (main == records && twin == records).then_some(())
        },
    )
    .await;
    let by_status = p.money_adds_up(&sku).await;
    let confirmed = by_status.get(&OrderStatus::Confirmed).copied().unwrap_or(0);
    let told_confirmed = settled
        .iter()
        .filter(|s| s.status.as_str() == "confirmed")
        .count();
    assert_eq!(told_confirmed, confirmed, "{by_status:?}");
    let levels = p.stores.stock.levels(&sku).await.unwrap().unwrap();
    assert_eq!(levels.sold as usize, confirmed, "{levels:?}");
    eprintln!("two runs each: {by_status:?}");
}

/// 10% declines, 5% errors, 5% charges answered after the worker gave up:
/// 200 purchases all end, each once, and the money adds up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn declines_errors_and_ambiguous_timeouts_never_charge_twice() {
    let p = Arc::new(
        Pipeline::start(PipelineOptions {
            env: vec![("FLASHSALE_PAYMENT_TIMEOUT_MS", "300".into())],
            ..Default::default()
        })
        .await
        .expect("pipeline starts"),
    );
    p.stores
        .payment
        .set_behaviour(&StubBehaviour {
            decline_rate: 0.1,
            latency: LatencyModel::LogNormal {
                p50_ms: 5.0,
                p99_ms: 50.0,
            },
            error_rate: 0.05,
            timeout_rate: 0.05,
            hang_ms: 1_000,
            outage: false,
        })
        .await
        .unwrap();
    let sku = p.sku("flaky");
    p.create_sale(&sku, 200, 1).await.unwrap();
    let settled = buy_all(&p, sku.as_str(), 200).await;
    let mut reasons: HashMap<String, usize> = HashMap::new();
    for s in &settled {
        let label = format!("{}:{}", s.status, s.reason.clone().unwrap_or_default());
        *reasons.entry(label).or_default() += 1;
    }
    println!("outcomes: {reasons:?}");
    for s in &settled {
        assert!(
            s.status.as_str() == "confirmed"
                || (s.status.as_str() == "cancelled"
                    && s.reason.as_deref() == Some("payment_declined")),
            "only declines may cancel: {s:?}"
        );
    }
    let payment_url = &p.cli.payment_url;
    let hung = p
        .metric(payment_url, "payment_charges_total{outcome=\"hung\"}")
        .await;
    let errors = p
        .metric(payment_url, "payment_charges_total{outcome=\"error\"}")
        .await;
    assert!(
        hung > 0.0 && errors > 0.0,
        "the stub failed too little: {hung} hung, {errors} errors"
    );
    let order_metrics = p.worker_metrics.last().expect("an order-worker");
    let found = p
        .metric(
            order_metrics,
            "order_charges_total{outcome=\"found_by_key\"}",
        )
        .await;
    assert!(found > 0.0, "no unanswered charge was looked up by its key");
    // The checks read the stub too: no more failures from here.
    p.stores
        .payment
        .set_behaviour(&StubBehaviour::simple(0.1, 5))
        .await
        .unwrap();
    let by_status = p.money_adds_up(&sku).await;
    assert_eq!(by_status.values().sum::<usize>(), 200);

    // `flashsale order show`: every step's time, the payment id, the charge.
    for s in [
        settled.iter().find(|s| s.status.as_str() == "confirmed"),
        settled.iter().find(|s| s.status.as_str() == "cancelled"),
    ]
    .into_iter()
    .flatten()
    {
        let id = RequestId::parse(&s.request_id).unwrap();
        let view = order::show(&p.stores, id).await.unwrap().expect("known");
        let record = view.order.expect("an order");
        let charge = view.charge.expect("a charge");
        assert_eq!(record.payment_id.as_deref(), Some(charge.id.as_str()));
        assert_eq!(view.buyer_sees.map(|b| b.status), Some(s.status));
        if s.status.as_str() == "confirmed" {
            let (paid, confirmed) = (record.paid_at_ms.unwrap(), record.confirmed_at_ms.unwrap());
            assert!(
                record.created_at_ms <= paid && paid <= confirmed,
                "{record:?}"
            );
            assert_eq!(charge.status, ChargeStatus::Succeeded);
        } else {
            assert!(record.cancelled_at_ms.is_some() && record.paid_at_ms.is_none());
            assert_eq!(charge.status, ChargeStatus::Declined);
        }
    }
    match Arc::try_unwrap(p) {
        Ok(p) => p.stop().await,
        Err(_) => panic!("buyers still hold the pipeline"),
    }
}

/// The processor is down for 10 s in the middle of a sale: the breaker
/// opens, reservations wait, and every purchase is confirmed once it is
/// back. An outage shorter than the reservation TTL cancels nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ten_second_outage_opens_the_breaker_and_cancels_nothing() {
    let p = Arc::new(
        Pipeline::start(PipelineOptions {
            env: vec![
                ("FLASHSALE_PAYMENT_TIMEOUT_MS", "300".into()),
                ("FLASHSALE_PAYMENT_BREAKER_OPEN_MS", "1000".into()),
            ],
            payment_latency_ms: 20,
            ..Default::default()
        })
        .await
        .expect("pipeline starts"),
    );
    let sku = p.sku("outage");
    p.create_sale(&sku, 120, 1).await.unwrap();
    let order_metrics = p.worker_metrics.last().expect("an order-worker").clone();
    let outage = {
        let p = p.clone();
        let sku = sku.clone();
        tokio::spawn(async move {
            eventually(
                "some orders confirmed first",
                Duration::from_secs(60),
                || async {
                    let levels = p.stores.stock.levels(&sku).await.ok()??;
                    (levels.sold >= 20).then_some(())
                },
            )
            .await;
            let mut down = StubBehaviour::simple(0.0, 20);
            down.outage = true;
            p.stores.payment.set_behaviour(&down).await.unwrap();
            eventually_reads(
                "the breaker to open",
                Duration::from_secs(10),
                || p.metric(&order_metrics, "order_payment_breaker_open"),
                |open| *open == 1.0,
            )
            .await;
            // The outage's length is the scenario, not a wait for a condition.
            tokio::time::sleep(Duration::from_secs(10)).await;
            let sold_during = p.stores.stock.levels(&sku).await.unwrap().unwrap().sold;
            p.stores
                .payment
                .set_behaviour(&StubBehaviour::simple(0.0, 20))
                .await
                .unwrap();
            sold_during
        })
    };
    let settled = buy_all(&p, sku.as_str(), 120).await;
    let sold_during = outage.await.expect("outage task");
    for s in &settled {
        assert_eq!(s.status.as_str(), "confirmed", "{s:?}");
    }
    assert!(sold_during < 120, "the outage came too late to matter");
    let by_status = p.money_adds_up(&sku).await;
    assert_eq!(by_status.get(&OrderStatus::Confirmed), Some(&120));
    let order_metrics = p.worker_metrics.last().expect("an order-worker");
    assert_eq!(
        p.metric(order_metrics, "order_payment_breaker_open").await,
        0.0,
        "the breaker closed again"
    );
    match Arc::try_unwrap(p) {
        Ok(p) => p.stop().await,
        Err(_) => panic!("buyers still hold the pipeline"),
    }
}

/// The processor answers nothing, for longer than any retry may last: a
/// purchase whose reservation's deadline passes with every charge and
/// lookup unanswered is cancelled (`payment_unavailable`) once
/// `FLASHSALE_RETRY_DEADLINE_MS` more have passed, its units go back to
/// the sale, and its reservation is parked at the tail of the topic
/// rather than holding its partition. Once the processor is back, the
/// parked copy finds no charge to refund, and the money adds up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_processor_that_never_answers_cancels_the_purchase_and_frees_its_partition() {
    let p = Pipeline::start(PipelineOptions {
        env: vec![
            ("FLASHSALE_PAYMENT_TIMEOUT_MS", "300".into()),
            ("FLASHSALE_PAYMENT_BREAKER_OPEN_MS", "500".into()),
            ("FLASHSALE_RETRY_DEADLINE_MS", "2000".into()),
        ],
        ..Default::default()
    })
    .await
    .expect("pipeline starts");
    let sku = p.sku("deadline");
    let mut spec = Pipeline::spec(&sku, 1, 1);
    spec.reservation_ttl = Duration::from_secs(3);
    p.create_sale_with(&spec).await.expect("a sale");
    let mut down = StubBehaviour::simple(0.0, 5);
    down.outage = true;
    p.stores.payment.set_behaviour(&down).await.expect("outage");

    let first = format!("{}-first", p.prefix);
    let (status, body) = p.buy(sku.as_str(), &first, Some(&first)).await;
    assert_eq!(status, 202, "{body}");
    let first = body["request_id"].as_str().expect("an id").to_owned();
    let order = eventually(
        "the order cancelled while the processor is down",
        Duration::from_secs(60),
        || async {
            p.order(&first)
                .await
                .filter(|o| o.status == OrderStatus::Cancelled)
        },
    )
    .await;
    assert_eq!(order.reason.as_deref(), Some("payment_unavailable"));
    assert_eq!(order.payment_id, None);
    let reservations = p.topic(flashsale_testkit::flashsale_core::bus::kafka::topic::RESERVATIONS);
    eventually(
        "the order stage committed past the reservation, the processor still down",
        Duration::from_secs(30),
        || async {
            let committed = p.committed("flashsale-orders", &reservations).await.ok()?;
            (committed >= 1).then_some(())
        },
    )
    .await;
    let order_metrics = p.worker_metrics.last().expect("an order-worker");
    assert!(p.metric(order_metrics, "order_parked_total").await >= 1.0);
    let status = p.terminal(&first).await;
    assert_eq!(status.status.as_str(), "cancelled", "{status:?}");
    let levels = p
        .stores
        .stock
        .levels(&sku)
        .await
        .expect("Redis")
        .expect("the sale");
    assert_eq!((levels.available, levels.reserved, levels.sold), (1, 0, 0));

    // Back: the unit sells to the next buyer.
    p.set_payment(0.0, 5).await.expect("the processor is back");
    let second = format!("{}-second", p.prefix);
    let (status, body) = p.buy(sku.as_str(), &second, Some(&second)).await;
    assert_eq!(status, 202, "{body}");
    let second = p
        .terminal(body["request_id"].as_str().expect("an id"))
        .await;
    assert_eq!(second.status.as_str(), "confirmed", "{second:?}");
    let by_status = p.money_adds_up(&sku).await;
    assert_eq!(by_status.get(&OrderStatus::Confirmed), Some(&1));
    assert_eq!(by_status.get(&OrderStatus::Cancelled), Some(&1));
    p.stop().await;
}

/// An order-worker process of the pipeline; with `crash_after`, it aborts
/// (like SIGKILL: no drain, no commit, no goodbye to the group) there.
fn order_worker_process(p: &Pipeline, crash_after: Option<&str>) -> ServiceProcess {
    let crash: Vec<(&str, String)> = crash_after
        .map(|point| ("FLASHSALE_ORDER_CRASH_AFTER", point.to_owned()))
        .into_iter()
        .collect();
    p.service_process("order-worker", &crash)
}

/// Starts an order-worker process that aborts at `point` with the first
/// reservation it reaches there, and waits until it has. Returns when its
/// replacement may join the group (see `replacement_may_join`).
async fn crash_at(p: &Pipeline, point: &str) -> tokio::time::Instant {
    let mut doomed = order_worker_process(p, Some(point));
    let died = eventually(
        "the worker to die at its crash point",
        Duration::from_secs(60),
        || {
            let exited = doomed.exited();
            async move { exited }
        },
    )
    .await;
    assert!(!died.success(), "aborted at {point}: {died:?}");
    replacement_may_join(tokio::time::Instant::now())
}

/// tansu 0.6 drops a dead member only when another request of its group
/// arrives after the member's session ran out. A replacement that joins
/// before then forms a generation with the dead member as leader, and once
/// the broker drops it the group stays formed with no assignment at all:
/// the partitions are stranded until the next rebalance. Joining after the
/// session has run out, the replacement's own join drops the dead member
/// first and it gets every partition, as it would at once on Kafka.
fn replacement_may_join(died_at: tokio::time::Instant) -> tokio::time::Instant {
    died_at + SESSION_TIMEOUT + Duration::from_secs(1)
}

/// Killed right after the order was put, right after the processor charged
/// (before the Redis commit), and right after the Redis commit (before the
/// DynamoDB confirm): a new worker finishes each saga, with one charge, one
/// terminal state and a clean audit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_worker_killed_at_each_step_is_finished_by_the_next() {
    let p = Arc::new(
        Pipeline::start(PipelineOptions {
            order_workers: 0,
            ..Default::default()
        })
        .await
        .expect("pipeline starts"),
    );
    let sku = p.sku("killed");
    p.create_sale(&sku, 10, 1).await.unwrap();
    for (n, point) in ["put", "charge", "commit"].into_iter().enumerate() {
        let user = format!("{}-k{n}", p.prefix);
        let (status, body) = p.buy(sku.as_str(), &user, Some(&user)).await;
        assert_eq!(status, 202, "{body}");
        let id = body["request_id"].as_str().unwrap().to_owned();

        let rejoin = crash_at(&p, point).await;
        let order = p
            .order(&id)
            .await
            .expect("the order was put before the crash");
        // Nothing is written to the order between its put and its confirm:
        // where the saga stood shows in the processor and in Redis.
        assert_eq!(order.status, OrderStatus::Pending, "where {point} left it");
        let charge = p.stores.payment.find_charge(order.order_id).await.unwrap();
        assert_eq!(
            charge.map(|c| c.status),
            (point != "put").then_some(ChargeStatus::Succeeded),
            "the charge after a crash at {point}"
        );
        let levels = p.stores.stock.levels(&sku).await.unwrap().unwrap();
        let committed = i64::from(point == "commit");
        assert_eq!(
            (levels.reserved, levels.sold),
            (1 - committed, n as i64 + committed),
            "Redis after a crash at {point}"
        );

        tokio::time::sleep_until(rejoin).await;
        let next = order_worker_process(&p, None);
        let settled = p.terminal(&id).await;
        assert_eq!(
            settled.status.as_str(),
            "confirmed",
            "after a crash at {point}"
        );
        drop(next);
    }
    let by_status = p.money_adds_up(&sku).await;
    assert_eq!(by_status.get(&OrderStatus::Confirmed), Some(&3));
    match Arc::try_unwrap(p) {
        Ok(p) => p.stop().await,
        Err(_) => panic!("the pipeline is still shared"),
    }
}

/// Redis is lost while a paid order waits for its confirm (its worker died
/// right after the Redis commit): DynamoDB still says `PENDING`, and only
/// the processor knows it was paid. Recovery counts the unit sold, not
/// reserved (the sweep would hand a reserved unit to another buyer while
/// the paid order confirms it), and the next worker confirms the order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paid_order_whose_redis_was_lost_is_recovered_sold_and_confirmed() {
    let p = Arc::new(
        Pipeline::start(PipelineOptions {
            order_workers: 0,
            own_redis: true,
            ..Default::default()
        })
        .await
        .expect("pipeline starts"),
    );
    let sku = p.sku("paid-lost");
    p.create_sale(&sku, 3, 1).await.unwrap();
    let user = format!("{}-payer", p.prefix);
    let (status, body) = p.buy(sku.as_str(), &user, Some(&user)).await;
    assert_eq!(status, 202, "{body}");
    let id = body["request_id"].as_str().unwrap().to_owned();
    let rejoin = crash_at(&p, "commit").await;

    let own = p.redis.as_ref().expect("own redis");
    own.kill().unwrap();
    own.wipe_and_restart().await.unwrap();
    let recovered = eventually("a recovery", Duration::from_secs(60), || async {
        p.stores.recover(&p.cli, &sku, false).await.ok()
    })
    .await;
    assert_eq!((recovered.from_orders, recovered.from_topic), (1, 0));
    let levels = &recovered.levels;
    assert_eq!(
        (levels.available, levels.reserved, levels.sold),
        (2, 0, 1),
        "the paid order's unit"
    );
    assert_eq!(
        p.order(&id).await.map(|o| o.status),
        Some(OrderStatus::Pending),
        "the recovery must have seen the paid order still pending"
    );
    tokio::time::sleep_until(rejoin).await;
    let next = order_worker_process(&p, None);

    let settled = p.terminal(&id).await;
    assert_eq!(settled.status.as_str(), "confirmed", "{settled:?}");
    drop(next);
    let by_status = p.money_adds_up(&sku).await;
    assert_eq!(by_status.get(&OrderStatus::Confirmed), Some(&1));
    match Arc::try_unwrap(p) {
        Ok(p) => p.stop().await,
        Err(_) => panic!("the pipeline is still shared"),
    }
}

/// A saga whose confirm can never succeed (here: the sale in DynamoDB was
/// replaced while the charge was in flight, so the inventory condition
/// fails) retries with a growing wait, not in a tight loop, and counts
/// each pass that left the order `PENDING` for an alert to fire on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_confirm_that_is_always_refused_backs_off_and_is_counted() {
    let p = Pipeline::start(PipelineOptions {
        payment_latency_ms: 1_000,
        ..PipelineOptions::default()
    })
    .await
    .expect("pipeline starts");
    let sku = p.sku("refused");
    let rules = p.create_sale(&sku, 5, 1).await.unwrap();
    let (status, body) = p.buy(sku.as_str(), "ida", None).await;
    assert_eq!(status, 202, "{body}");
    let id = body["request_id"].as_str().expect("request id").to_owned();
    // While the charge is in flight, the sale in DynamoDB becomes another.
    eventually("the order put", SESSION_TIMEOUT, || async {
        p.order(&id).await.map(|_| ())
    })
    .await;
    let mut replaced = rules.clone();
    replaced.sale_id = "another-sale".into();
    p.stores.inventory.put(&sku, &replaced).await.unwrap();
    // Every pass after the first is quick: only the confirm holds it up.
    p.set_payment(0.0, 0).await.unwrap();

    let order_metrics = p.worker_metrics.last().expect("an order-worker").clone();
    let confirms = || {
        p.metric(
            &order_metrics,
            "order_dynamodb_requests_total{op=\"confirm\"}",
        )
    };
    eventually("a refused confirm", SESSION_TIMEOUT, || async {
        (confirms().await >= 1.0).then_some(())
    })
    .await;
    let before = confirms().await;
    // The measurement window: how often it tries in 3 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let tried = confirms().await - before;
    assert!(tried <= 12.0, "{tried} confirms in 3 s: a tight loop");
    let stalls = p.metric(&order_metrics, "order_saga_stalls_total").await;
    assert!(stalls >= 2.0, "stalls counted: {stalls}");
    assert_eq!(
        p.order(&id).await.map(|o| o.status),
        Some(OrderStatus::Pending)
    );
    p.stop().await;
}

/// An Idempotency-Key reused after its first purchase left the status
/// board (retention), for another sku or in a later sale of the same sku:
/// the reuse is found from the durable order and the markers, the new
/// purchase is refused (`idempotency_key_reused`) with its units given
/// back, and the buyer is never told the first purchase's `confirmed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_reused_after_the_board_forgot_it_is_refused_not_confirmed() {
    use flashsale_testkit::flashsale_core::status::board;
    let p = Pipeline::start(PipelineOptions::default())
        .await
        .expect("pipeline starts");
    let (first, other) = (p.sku("reused-a"), p.sku("reused-b"));
    p.create_sale(&first, 2, 1).await.unwrap();
    p.create_sale(&other, 2, 1).await.unwrap();
    let user = format!("{}-kim", p.prefix);
    let redis = redis::Client::open(p.cli.redis.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let forget = |id: String| {
        let mut redis = redis.clone();
        async move {
            redis::cmd("DEL")
                .arg(board::key(&id))
                .query_async::<i64>(&mut redis)
                .await
                .unwrap()
        }
    };

    let (status, body) = p.buy(first.as_str(), &user, Some("k1")).await;
    assert_eq!(status, 202, "{body}");
    let id = body["request_id"].as_str().unwrap().to_owned();
    assert_eq!(p.terminal(&id).await.status.as_str(), "confirmed");
    assert_eq!(forget(id.clone()).await, 1, "the board forgot it");

    // The same key for another sku.
    let (status, body) = p.buy(other.as_str(), &user, Some("k1")).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["request_id"], id.as_str(), "the same request id");
    let told = p.terminal(&id).await;
    assert_eq!(
        (
            told.status.as_str(),
            told.reason.as_deref(),
            told.sku.as_str()
        ),
        ("cancelled", Some("idempotency_key_reused"), other.as_str()),
        "{told:?}"
    );
    eventually(
        "the other sku's unit back",
        Duration::from_secs(30),
        || async {
            let levels = p.stores.stock.levels(&other).await.ok()??;
            (levels.available == 2).then_some(())
        },
    )
    .await;
    let order = p.order(&id).await.expect("the first order");
    assert_eq!(
        (order.sku, order.status),
        (first.clone(), OrderStatus::Confirmed)
    );

    // The same key in a later sale of the first sku.
    let mut spec = Pipeline::spec(&first, 2, 1);
    spec.per_user_limit = 1;
    p.create_sale_with(&spec).await.unwrap();
    assert_eq!(forget(id.clone()).await, 1);
    let (status, body) = p.buy(first.as_str(), &user, Some("k1")).await;
    assert_eq!(
        (status, body["type"].as_str()),
        (422, Some("idempotency-key-reused")),
        "{body}"
    );
    let levels = p.stores.stock.levels(&first).await.unwrap().unwrap();
    assert_eq!((levels.available, levels.sold), (2, 0), "{levels:?}");
    p.stop().await;
}
