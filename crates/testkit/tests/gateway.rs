//! The gateway's shedding against the real stack: a crowd far larger than
//! the stock, each limit's answer, one key sent many times at once, and
//! garbage of every kind.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure here is the test's answer

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flashsale_testkit::flashsale_cli::sale::SaleSpec;
use flashsale_testkit::flashsale_core::ids::{RequestId, UserId};
use flashsale_testkit::flashsale_core::stock::{Answered, ReleaseOutcome, ReserveOutcome};
use flashsale_testkit::{Answer, Pipeline, PipelineOptions, eventually};
use futures::StreamExt;
use serde_json::{Value, json};

/// 20,000 buyers at once for 200 units: at most ceil(200 x 1.5) = 300
/// purchases reach Kafka, every other buyer is answered at once with a
/// refusal that says why, every unit sells, and the audit is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_thousand_buyers_for_two_hundred_units_queue_at_most_the_window() {
    let p = Arc::new(
        Pipeline::start(PipelineOptions::default())
            .await
            .expect("pipeline starts"),
    );
    let sku = p.sku("crowd20k");
    p.create_sale(&sku, 200, 1).await.unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(256));
    let started = Instant::now();
    let buyers: Vec<_> = (0..20_000)
        .map(|n| {
            let (p, gate, sku) = (p.clone(), gate.clone(), sku.clone());
            tokio::spawn(async move {
                let _connection = gate.acquire_owned().await.expect("gate");
                let user = format!("{}-b{n}", p.prefix);
                p.post_purchase(&p.gateway_url, sku.as_str(), &user, None)
                    .await
                    .expect("the gateway answers every buyer")
            })
        })
        .collect();
    let mut accepted = Vec::new();
    let mut refused: HashMap<(u16, String), u64> = HashMap::new();
    for buyer in buyers {
        let answer = buyer.await.expect("buyer task");
        match answer.status {
            202 => accepted.push(answer.body["request_id"].as_str().unwrap().to_owned()),
            409 => assert_eq!(answer.kind(), "sold-out", "{answer:?}"),
            429 | 503 => assert!(
                answer.retry_after().is_some(),
                "{} without Retry-After: {answer:?}",
                answer.status
            ),
            other => panic!("unexpected {other}: {answer:?}"),
        }
        if answer.status != 202 {
            *refused
                .entry((answer.status, answer.kind().to_owned()))
                .or_default() += 1;
        }
    }
    println!(
        "20,000 buyers answered in {:?}: {} accepted, refused {refused:?}",
        started.elapsed(),
        accepted.len()
    );
    assert!(
        accepted.len() <= 300,
        "{} purchases accepted for 200 units; the window is 300",
        accepted.len()
    );
    assert!(accepted.len() >= 200, "only {} accepted", accepted.len());
    assert_eq!(
        p.records_in(&p.purchase_topic()).await.unwrap(),
        accepted.len() as i64,
        "exactly the accepted purchases reached Kafka"
    );
    let settled = futures::future::join_all(accepted.iter().map(|id| p.terminal(id))).await;
    let confirmed = settled
        .iter()
        .filter(|s| s.status.as_str() == "confirmed")
        .count();
    assert_eq!(confirmed, 200, "every unit sold");
    let levels = p.stores.stock.levels(&sku).await.unwrap().unwrap();
    assert_eq!(
        (levels.sold, levels.reserved, levels.available),
        (200, 0, 0)
    );
    let audit = p.stores.audit(&sku, true).await.unwrap();
    assert!(audit.ok(), "{:?}", audit.violations);
    match Arc::try_unwrap(p) {
        Ok(p) => p.stop().await,
        Err(_) => panic!("buyers still hold the pipeline"),
    }
}

/// The window of a sku, the queue position, sold out and reopened; then
/// each protection limit on a gateway of its own: per buyer (429), per
/// instance (503), produces in flight (503), request timeout (503), body
/// size (413). Every refusal that may pass says when to retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_limit_answers_its_status_with_retry_after() {
    let mut p = Pipeline::gateways_only().await;
    let url = p.gateway_url.clone();
    let sku = p.sku("window");
    p.create_sale(&sku, 3, 1).await.unwrap();
    let prefix = p.prefix.clone();
    let buyer = move |n: u32| format!("{prefix}-w{n}");

    // One purchase reserved, so the shop-workers' group has committed an
    // offset on the sku's partition; then they stop.
    let shop = p.add_shop_worker().await.unwrap();
    let first = p
        .post_purchase(&url, sku.as_str(), &buyer(0), None)
        .await
        .unwrap();
    assert_eq!(first.status, 202, "{first:?}");
    let first_id = first.body["request_id"].as_str().unwrap().to_owned();
    eventually(
        "the first purchase reserved",
        Duration::from_secs(30),
        || async {
            p.status_of(&first_id, 1)
                .await
                .filter(|s| s.status.as_str() == "reserved")
        },
    )
    .await;
    shop.stop().await.unwrap();

    // 3 units not sold: ceil(3 x 1.5) = 5 buyers may hold or wait, and
    // one holds; 4 more are let in, the next is told sold out for good.
    let mut queued = Vec::new();
    for n in 1..=4 {
        let answer = p
            .post_purchase(&url, sku.as_str(), &buyer(n), Some("k"))
            .await
            .unwrap();
        assert_eq!(answer.status, 202, "{answer:?}");
        queued.push(answer.body["request_id"].as_str().unwrap().to_owned());
    }
    let full = p
        .post_purchase(&url, sku.as_str(), &buyer(5), None)
        .await
        .unwrap();
    assert_eq!((full.status, full.kind()), (409, "sold-out"), "{full:?}");
    assert_eq!(full.retry_after(), None, "a final answer: no retry invited");
    for (n, id) in queued.iter().enumerate() {
        let status = p.status_of(id, 0).await.expect("queued status");
        assert_eq!(status.status.as_str(), "queued");
        assert_eq!(status.queue_position, Some(n as u64 + 1), "{status:?}");
    }

    // The shop-worker answers them: two reserved, the other two wait in
    // the line, in arrival order, for the 3 reserved units to come back.
    let _shop = p.add_shop_worker().await.unwrap();
    for (n, id) in queued.iter().enumerate().skip(2) {
        let waiting = eventually("a buyer in the line", Duration::from_secs(30), || async {
            p.status_of(id, 0)
                .await
                .filter(|s| s.status.as_str() == "waiting")
        })
        .await;
        assert_eq!(waiting.queue_position, Some(n as u64 - 1), "{waiting:?}");
        assert_eq!(waiting.units_may_return, Some(3), "{waiting:?}");
        assert!(
            waiting.wait_at_most_s.is_some_and(|s| s <= 600),
            "{waiting:?}"
        );
    }
    // The line is full: refused from memory, without asking Redis, with or
    // without a key; a repeated key of a buyer in line reads its place.
    eventually(
        "the gateway to hold the line full",
        Duration::from_secs(5),
        || async {
            let view = p.sku_view(&url, &sku).await?;
            (view["gateway"]["line_full"] == true).then_some(())
        },
    )
    .await;
    let asked = redis_calls(&p, &url).await;
    for key in [None, Some("new")] {
        let gone = p
            .post_purchase(&url, sku.as_str(), &buyer(6), key)
            .await
            .unwrap();
        assert_eq!((gone.status, gone.kind()), (409, "sold-out"), "{gone:?}");
    }
    assert_eq!(
        redis_calls(&p, &url).await,
        asked,
        "a full line costs no Redis call"
    );
    let again = p
        .post_purchase(&url, sku.as_str(), &buyer(4), Some("k"))
        .await
        .unwrap();
    assert_eq!(
        (again.status, again.body["status"].as_str()),
        (202, Some("waiting")),
        "{again:?}"
    );
    assert_eq!(again.body["request_id"].as_str(), Some(queued[3].as_str()));

    // A release gives the unit to the head of the line, who sent nothing
    // again; one place is free once more.
    let Answered { outcome, line } = p
        .stores
        .stock
        .release(
            &sku,
            RequestId::parse(&first_id).unwrap(),
            "payment_declined",
            flashsale_testkit::flashsale_core::clock::now_ms(),
        )
        .await
        .unwrap();
    assert!(matches!(outcome, ReleaseOutcome::Released { .. }));
    assert_eq!(line.len(), 1, "{line:?}");
    assert_eq!(line[0].id.to_string(), queued[2]);
    assert!(matches!(line[0].outcome, ReserveOutcome::Reserved { .. }));
    eventually(
        "a purchase accepted again",
        Duration::from_secs(5),
        || async {
            let answer = p
                .post_purchase(&url, sku.as_str(), &buyer(7), None)
                .await
                .ok()?;
            (answer.status == 202).then_some(())
        },
    )
    .await;

    // The protection limits, each on a gateway of its own.
    let plenty = p.sku("plenty");
    p.create_sale(&plenty, 100_000, 1).await.unwrap();
    let per_user = p
        .add_gateway(&[
            // Slow enough that no pause of a busy test machine refills it.
            ("FLASHSALE_GATEWAY_USER_RPS", "0.01".into()),
            ("FLASHSALE_GATEWAY_USER_BURST", "2".into()),
        ])
        .await
        .unwrap();
    let user = buyer(10);
    for key in ["a", "b"] {
        let answer = p
            .post_purchase(&per_user, plenty.as_str(), &user, Some(key))
            .await
            .unwrap();
        assert_eq!(answer.status, 202, "{answer:?}");
    }
    let limited = p
        .post_purchase(&per_user, plenty.as_str(), &user, Some("c"))
        .await
        .unwrap();
    assert_eq!(
        (limited.status, limited.kind()),
        (429, "user-rate-limited"),
        "{limited:?}"
    );
    assert!(limited.retry_after().is_some_and(|s| s >= 1));
    assert_eq!(limited.header("ratelimit-limit"), Some("2"));
    assert_eq!(limited.header("ratelimit-remaining"), Some("0"));
    assert!(limited.header("ratelimit-reset").is_some());
    let other = p
        .post_purchase(&per_user, plenty.as_str(), &buyer(11), None)
        .await
        .unwrap();
    assert_eq!(other.status, 202, "another buyer is not limited: {other:?}");

    let global = p
        .add_gateway(&[
            ("FLASHSALE_GATEWAY_MAX_RPS", "0.01".into()),
            ("FLASHSALE_GATEWAY_BURST", "2".into()),
        ])
        .await
        .unwrap();
    let answers = [
        p.post_purchase(&global, plenty.as_str(), &buyer(20), None)
            .await
            .unwrap(),
        p.post_purchase(&global, plenty.as_str(), &buyer(21), None)
            .await
            .unwrap(),
        p.post_purchase(&global, plenty.as_str(), &buyer(22), None)
            .await
            .unwrap(),
    ];
    assert_eq!([answers[0].status, answers[1].status], [202, 202]);
    assert_eq!(
        (answers[2].status, answers[2].kind()),
        (503, "overloaded"),
        "{:?}",
        answers[2]
    );
    assert!(answers[2].retry_after().is_some_and(|s| s >= 1));
    assert_eq!(answers[2].header("ratelimit-limit"), Some("2"));

    // One produce in flight at a time: of 100 buyers at once, those who
    // find it taken are refused, and only the others reach Kafka.
    let narrow = p
        .add_gateway(&[("FLASHSALE_GATEWAY_MAX_IN_FLIGHT", "1".into())])
        .await
        .unwrap();
    let before = p.records_in(&p.purchase_topic()).await.unwrap();
    let p = Arc::new(p);
    let answers: Vec<Answer> = futures::future::join_all((0..100).map(|n| {
        let (p, narrow, plenty) = (p.clone(), narrow.clone(), plenty.clone());
        async move {
            p.post_purchase(
                &narrow,
                plenty.as_str(),
                &format!("{}-f{n}", p.prefix),
                None,
            )
            .await
            .unwrap()
        }
    }))
    .await;
    let passed = answers.iter().filter(|a| a.status == 202).count() as i64;
    let turned_away: Vec<&Answer> = answers.iter().filter(|a| a.status != 202).collect();
    assert!(
        !turned_away.is_empty(),
        "100 at once never found the one slot taken"
    );
    for answer in &turned_away {
        assert_eq!(
            (answer.status, answer.kind()),
            (503, "overloaded"),
            "{answer:?}"
        );
        assert!(answer.retry_after().is_some());
    }
    assert_eq!(
        p.records_in(&p.purchase_topic()).await.unwrap(),
        before + passed
    );

    // A purchase the broker did not acknowledge in time is voided and
    // answered 503 (its record, if it lands, will be dropped untold); the
    // retry with the same key is taken as new, under the same request id.
    let Ok(mut p) = Arc::try_unwrap(p) else {
        panic!("no buyer holds the pipeline any more")
    };
    let hasty = p
        .add_gateway(&[("FLASHSALE_GATEWAY_REQUEST_TIMEOUT_MS", "1".into())])
        .await
        .unwrap();
    let before = p.records_in(&p.purchase_topic()).await.unwrap();
    let user = buyer(30);
    let late = p
        .post_purchase(&hasty, plenty.as_str(), &user, Some("slow"))
        .await
        .unwrap();
    assert_eq!(
        (late.status, late.kind()),
        (503, "temporarily-unavailable"),
        "{late:?}"
    );
    assert!(late.retry_after().is_some());
    let again = eventually(
        "the retry to find the purchase",
        Duration::from_secs(10),
        || async {
            let answer = p
                .post_purchase(&url, plenty.as_str(), &user, Some("slow"))
                .await
                .ok()?;
            (answer.status == 202).then_some(answer)
        },
    )
    .await;
    let expected = RequestId::derive(
        &UserId::parse(&user).unwrap(),
        &flashsale_testkit::flashsale_core::ids::IdempotencyKey::parse("slow").unwrap(),
    );
    assert_eq!(again.body["request_id"], expected.to_string());
    // The voided record went on to Kafka, and the retry's after it.
    let records = eventually("both records", Duration::from_secs(10), || async {
        let records = p.records_in(&p.purchase_topic()).await.ok()?;
        (records == before + 2).then_some(records)
    })
    .await;
    assert_eq!(records, before + 2);

    let huge = p
        .http
        .post(format!("{url}/v1/purchases"))
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"sku":"{plenty}","user_id":"{}","quantity":1}}"#,
            "x".repeat(10_000)
        ))
        .send()
        .await
        .unwrap();
    let huge = Answer::of(huge).await.unwrap();
    assert_eq!(
        (huge.status, huge.kind()),
        (413, "body-too-large"),
        "{huge:?}"
    );
    p.stop().await;
}

const CALLERS_TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// The same Idempotency-Key sent 20 times at once: one purchase, queued
/// once; every answer names it or says it is in progress; the record
/// carries the caller's trace. A long poll returns as soon as the purchase
/// is terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_key_sent_twenty_times_at_once_is_queued_once() {
    let mut p = Pipeline::start(PipelineOptions {
        payment_latency_ms: 500,
        ..Default::default()
    })
    .await
    .expect("pipeline starts");
    let unlimited = p
        .add_gateway(&[("FLASHSALE_GATEWAY_USER_RPS", "0".into())])
        .await
        .unwrap();
    let sku = p.sku("onekey");
    p.create_sale(&sku, 5, 1).await.unwrap();
    let user = format!("{}-keen", p.prefix);
    let p = Arc::new(p);
    let answers: Vec<Answer> = futures::future::join_all((0..20).map(|_| {
        let (p, url, sku, user) = (p.clone(), unlimited.clone(), sku.clone(), user.clone());
        async move {
            let response = p
                .http
                .post(format!("{url}/v1/purchases"))
                .header("Idempotency-Key", "the-key")
                .header("traceparent", CALLERS_TRACE)
                .json(&json!({"sku": sku.as_str(), "user_id": user, "quantity": 1}))
                .send()
                .await
                .unwrap();
            Answer::of(response).await.unwrap()
        }
    }))
    .await;
    let ids: std::collections::HashSet<&str> = answers
        .iter()
        .filter(|a| a.status == 202)
        .map(|a| a.body["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 1, "{answers:?}");
    for answer in answers.iter().filter(|a| a.status != 202) {
        assert_eq!(
            (answer.status, answer.kind()),
            (409, "request-in-progress"),
            "{answer:?}"
        );
        assert!(answer.retry_after().is_some());
    }
    assert_eq!(p.records_in(&p.purchase_topic()).await.unwrap(), 1);
    let record = p
        .first_record(&p.purchase_topic(), Duration::from_secs(10))
        .await
        .unwrap();
    let carried =
        flashsale_testkit::flashsale_core::bus::kafka::header(&record, "traceparent").unwrap();
    assert_eq!(
        carried.split('-').nth(1),
        CALLERS_TRACE.split('-').nth(1),
        "the record continues the caller's trace: {carried}"
    );

    let id = ids.into_iter().next().unwrap().to_owned();
    let asked = Instant::now();
    let status = p.status_of(&id, 20).await.expect("a status");
    assert_eq!(status.status.as_str(), "confirmed", "{status:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(15),
        "the long poll returned at the terminal state, not at its end"
    );
    let Ok(p) = Arc::try_unwrap(p) else {
        panic!("no buyer holds the pipeline any more")
    };
    p.stop().await;
}

/// Every answer the shared admission window gave on this gateway.
/// A sale past its end is refused from memory (`409 sale-not-active`), with
/// or without a key: the end travels with the flags.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sale_past_its_end_is_refused_from_memory() {
    let p = Pipeline::gateways_only().await;
    let url = p.gateway_url.clone();
    let sku = p.sku("ending");
    p.create_sale_with(&SaleSpec {
        duration: Duration::from_secs(2),
        ..Pipeline::spec(&sku, 10, 1)
    })
    .await
    .unwrap();
    let ends_at = eventually(
        "the gateway to know the sale",
        Duration::from_secs(5),
        || async {
            let view = p.sku_view(&url, &sku).await?;
            view["gateway"].is_object().then_some(())?;
            p.stores
                .inventory
                .get(&sku)
                .await
                .ok()?
                .map(|i| i.rules.ends_at_ms)
        },
    )
    .await;
    let now = flashsale_testkit::flashsale_core::clock::now_ms();
    tokio::time::sleep(Duration::from_millis(ends_at.saturating_sub(now) + 50)).await;
    let asked = redis_calls(&p, &url).await;
    for key in [None, Some("late")] {
        let answer = p
            .post_purchase(&url, sku.as_str(), &format!("{}-late", p.prefix), key)
            .await
            .unwrap();
        assert_eq!(
            (answer.status, answer.kind()),
            (409, "sale-not-active"),
            "{answer:?}"
        );
    }
    assert_eq!(redis_calls(&p, &url).await, asked, "answered from memory");
    p.stop().await;
}

/// A sku whose sale DynamoDB holds but Redis has lost (not yet recovered)
/// is not unknown: a gateway that never saw it answers `503` with
/// `Retry-After` (retry with the same key), not `422 unknown-sku`; a sku
/// with no sale anywhere stays `422`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sale_lost_by_redis_is_unavailable_not_unknown() {
    let mut p = Pipeline::gateways_only().await;
    let sku = p.sku("lost-stock");
    p.create_sale(&sku, 5, 1).await.unwrap();
    p.stores.stock.unload(&sku).await.unwrap();
    // A gateway started after the loss has no memory of the sku.
    let fresh = p.add_gateway(&[]).await.unwrap();
    let answer = p
        .post_purchase(&fresh, sku.as_str(), "una", Some("una-1"))
        .await
        .unwrap();
    assert_eq!(
        (answer.status, answer.kind()),
        (503, "stock-unavailable"),
        "{:?}",
        answer.body
    );
    assert!(answer.retry_after().is_some(), "{:?}", answer.body);
    let nowhere = p.sku("never-sold");
    let answer = p
        .post_purchase(&fresh, nowhere.as_str(), "una", None)
        .await
        .unwrap();
    assert_eq!(
        (answer.status, answer.kind()),
        (422, "unknown-sku"),
        "{:?}",
        answer.body
    );
    p.stop().await;
}

/// Two gateways whose clocks disagree by ten minutes share one line: the
/// one ahead must not take the other's admissions for expired leases and
/// let in more buyers than the line holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateways_whose_clocks_differ_share_one_line_bound() {
    let mut p = Pipeline::gateways_only().await;
    let sku = p.sku("two-clocks");
    // 2 units, overbook 1.5: 3 buyers at most hold, wait or are on their way.
    p.create_sale(&sku, 2, 1).await.unwrap();
    let ahead = p
        .add_gateway(&[("FLASHSALE_GATEWAY_CLOCK_OFFSET_MS", "600000".into())])
        .await
        .unwrap();
    let url = p.gateway_url.clone();
    // Two let in by the first gateway, the third by the one ahead.
    for (n, gateway) in [(0, &url), (1, &url), (2, &ahead)] {
        let answer = p
            .post_purchase(gateway, sku.as_str(), &format!("{}-c{n}", p.prefix), None)
            .await
            .unwrap();
        assert_eq!(answer.status, 202, "{:?}", answer.body);
    }
    for n in 3..6 {
        let answer = p
            .post_purchase(&ahead, sku.as_str(), &format!("{}-c{n}", p.prefix), None)
            .await
            .unwrap();
        assert_eq!(
            (answer.status, answer.kind()),
            (409, "sold-out"),
            "the gateway ahead let a buyer past the bound: {:?}",
            answer.body
        );
    }
    p.stop().await;
}

/// Redis's count of commands processed so far.
async fn redis_commands(redis: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(redis)
        .await
        .expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("total_commands_processed")
}

/// Three thousand buyers long-poll purchases that do not move: they are
/// woken by the status changes the workers publish, not by polling, so
/// Redis sees a few commands per long-poll, not one every few hundred
/// milliseconds; a long-poll on a purchase that ends is answered at once;
/// and long-polls beyond the bound are refused with `429`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_polls_wait_on_published_changes_not_on_redis() {
    let p = Pipeline::start(PipelineOptions {
        shop_workers: 0,
        order_workers: 0,
        own_redis: true,
        env: vec![
            ("FLASHSALE_GATEWAY_USER_RPS", "0".into()),
            ("FLASHSALE_GATEWAY_MAX_WAITERS", "3500".into()),
        ],
        ..Default::default()
    })
    .await
    .expect("pipeline starts");
    let sku = p.sku("polled");
    p.create_sale(&sku, 5_000, 1).await.unwrap();
    // Queued purchases that no shop-worker will take.
    let ids: Vec<String> = futures::stream::iter(0..3_000)
        .map(|n| {
            let (p, sku) = (&p, &sku);
            async move {
                let (status, body) = p
                    .buy(sku.as_str(), &format!("{}-p{n}", p.prefix), None)
                    .await;
                assert_eq!(status, 202, "{body}");
                body["request_id"].as_str().expect("request id").to_owned()
            }
        })
        .buffered(128)
        .collect()
        .await;
    let mut redis = redis::Client::open(p.redis.as_ref().expect("own redis").url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let before = redis_commands(&mut redis).await;
    let started = Instant::now();
    let polls = futures::future::join_all(ids.iter().map(|id| {
        let url = format!("{}/v1/purchases/{id}?wait=4", p.gateway_url);
        let http = p.http.clone();
        async move { http.get(url).send().await.map(|r| r.status().as_u16()) }
    }));
    let answers = polls.await;
    let waited = started.elapsed();
    let commands = redis_commands(&mut redis).await - before;
    let ok = answers.iter().filter(|a| matches!(a, Ok(200))).count();
    eprintln!("{ok} long-polls of 4 s took {waited:?}; Redis processed {commands} commands");
    assert_eq!(
        ok,
        3_000,
        "{:?}",
        answers.iter().find(|a| !matches!(a, Ok(200)))
    );
    assert!(waited >= Duration::from_secs(4), "they waited: {waited:?}");
    // Each long-poll reads the board when it starts and when it ends.
    assert!(
        commands <= 3 * 3_000 + 500,
        "{commands} commands for 3,000 long-polls"
    );

    // A long-poll on a purchase that ends is answered when it ends.
    let id = ids[0].clone();
    let poll = {
        let url = format!("{}/v1/purchases/{id}?wait=20", p.gateway_url);
        let http = p.http.clone();
        tokio::spawn(async move {
            let body: Value = http.get(url).send().await.ok()?.json().await.ok()?;
            Some((Instant::now(), body))
        })
    };
    // The poll is waiting (it registered) before the purchase ends.
    eventually("the long-poll waiting", Duration::from_secs(10), || async {
        (p.metric(&p.gateway_url, "gateway_long_polls").await >= 1.0).then_some(())
    })
    .await;
    let user = UserId::parse(&format!("{}-p0", p.prefix)).unwrap();
    let subject = flashsale_testkit::flashsale_core::status::board::Subject {
        id: RequestId::parse(&id).unwrap(),
        sku: &sku,
        user: &user,
        quantity: flashsale_testkit::flashsale_core::ids::Quantity::new(1).unwrap(),
    };
    let ended = Instant::now();
    p.stores
        .board
        .post(
            &subject,
            flashsale_testkit::flashsale_core::status::PurchaseState::Rejected,
            Some("stale"),
            flashsale_testkit::flashsale_core::clock::now_ms(),
        )
        .await
        .unwrap();
    let (answered, body) = poll.await.unwrap().expect("an answer");
    let after = answered.duration_since(ended);
    eprintln!("a long-poll answered {after:?} after its purchase ended");
    assert_eq!(body["status"], "rejected", "{body}");
    assert!(after < Duration::from_secs(1), "{after:?}");
    p.stop().await;
}

/// The gateway's idempotent producer fails fatally (librdkafka's own test
/// hook, after the second purchase): it is replaced, purchases are taken
/// again within moments, and the replacement is counted; none of the
/// buyers refused meanwhile is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_producer_that_fails_fatally_is_replaced() {
    let mut p = Pipeline::gateways_only().await;
    let sku = p.sku("fatal");
    p.create_sale(&sku, 100, 1).await.unwrap();
    let fragile = p
        .add_gateway(&[
            ("FLASHSALE_KAFKA_TEST_FATAL_AFTER", "2".into()),
            ("FLASHSALE_GATEWAY_USER_RPS", "0".into()),
        ])
        .await
        .unwrap();
    let mut taken = 0;
    let mut refused = 0;
    let mut n = 0;
    let until = Instant::now() + Duration::from_secs(30);
    // Two taken, then the fatal error, then taken again.
    while taken < 4 {
        assert!(
            Instant::now() < until,
            "{taken} taken, {refused} refused: never taken again"
        );
        let answer = p
            .post_purchase(&fragile, sku.as_str(), &format!("{}-f{n}", p.prefix), None)
            .await
            .unwrap();
        n += 1;
        match answer.status {
            202 => taken += 1,
            503 => refused += 1,
            other => panic!("{other}: {:?}", answer.body),
        }
    }
    eprintln!("{taken} taken, {refused} refused while the producer was replaced");
    assert!(p.metric(&fragile, "gateway_producer_renewals").await >= 1.0);
    let queued = p.records_in(&p.purchase_topic()).await.unwrap();
    assert_eq!(queued, taken, "a refused purchase reached Kafka");
    p.stop().await;
}

async fn redis_calls(p: &Pipeline, url: &str) -> f64 {
    let mut sum = 0.0;
    for call in ["status", "admit"] {
        let sample = format!("gateway_purchase_redis_calls_total{{call=\"{call}\"}}");
        sum += p.metric(url, &sample).await;
    }
    sum
}

/// SplitMix64: seeded, so a failing case can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len() as u64) as usize]
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

const ODD_TEXT: &[&str] = &[
    "",
    " ",
    "ünïcödé-sku",
    "😀",
    "a/b",
    "a b",
    "{sku}",
    "..",
    "%00",
    "\u{202e}evil",
    "null",
    "DROP TABLE orders;",
];
const ODD_NUMBERS: &[&str] = &[
    "0",
    "-1",
    "1.5",
    "1e400",
    "-1e400",
    "18446744073709551616",
    "9223372036854775808",
    "340282366920938463463374607431768211456",
    "\"1\"",
    "null",
    "true",
    "[]",
    "{}",
    "1000000",
];

/// Garbage of every kind: random bytes, mutated fields, huge numbers,
/// unicode, wrong or missing content types, bad headers, deep nesting,
/// odd methods and paths. Every answer is a 4xx (or a 202 for what is in
/// fact a valid purchase), never a 5xx; only the 202s reach Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_gets_a_4xx_never_a_5xx_and_never_reaches_kafka() {
    let mut p = Pipeline::gateways_only().await;
    // No rate limits: every answer must come from the input alone.
    let url = p
        .add_gateway(&[
            ("FLASHSALE_GATEWAY_USER_RPS", "0".into()),
            ("FLASHSALE_GATEWAY_MAX_RPS", "0".into()),
        ])
        .await
        .unwrap();
    let sku = p.sku("fuzz");
    p.create_sale(&sku, 1_000_000, 1_000).await.unwrap();
    // A fresh connection per case: after refusing a body it did not read
    // (413) the server closes the connection, and a pooled client could
    // otherwise write the next case into the closed socket.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut rng = Rng(0x5EED_F00D);
    let mut accepted = 0i64;
    let mut seen: HashMap<u16, u64> = HashMap::new();
    for case in 0..3_000u32 {
        let user = format!("{}-z{case}", p.prefix);
        let valid = json!({"sku": sku.as_str(), "user_id": user, "quantity": 1}).to_string();
        let mut content_type = Some("application/json");
        let mut key: Option<Vec<u8>> = None;
        let (method, path, body): (&str, String, Vec<u8>) = match rng.below(9) {
            0 => {
                let len = rng.below(300) as usize;
                ("POST", "/v1/purchases".into(), rng.bytes(len))
            }
            1 => {
                let field = rng.pick(&["sku", "user_id", "quantity"]);
                let value = if rng.below(2) == 0 {
                    rng.pick(ODD_NUMBERS).to_owned()
                } else {
                    serde_json::to_string(rng.pick(ODD_TEXT)).unwrap()
                };
                let mut object: serde_json::Map<String, Value> =
                    serde_json::from_str(&valid).unwrap();
                object.remove(field);
                let text = Value::Object(object).to_string();
                let body = format!("{{\"{field}\":{value},{}", &text[1..]);
                ("POST", "/v1/purchases".into(), body.into_bytes())
            }
            2 => {
                content_type = match rng.below(3) {
                    0 => None,
                    1 => Some("text/plain"),
                    _ => Some("application/x-www-form-urlencoded"),
                };
                ("POST", "/v1/purchases".into(), valid.clone().into_bytes())
            }
            3 => {
                let depth = 1 + rng.below(5_000) as usize;
                let body = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
                let body = if rng.below(2) == 0 {
                    body
                } else {
                    format!(r#"{{"sku":"{sku}","user_id":"{user}","quantity":1,"extra":{body}}}"#)
                };
                ("POST", "/v1/purchases".into(), body.into_bytes())
            }
            4 => {
                let len = 4_097 + rng.below(60_000) as usize;
                ("POST", "/v1/purchases".into(), vec![b'{'; len])
            }
            5 => {
                key = Some(match rng.below(3) {
                    0 => vec![0xC3, 0xA9, 0xFF],
                    1 => Vec::new(),
                    _ => vec![b'k'; 256 + rng.below(1_000) as usize],
                });
                ("POST", "/v1/purchases".into(), valid.clone().into_bytes())
            }
            6 => ("POST", "/v1/purchases".into(), valid.clone().into_bytes()),
            7 => {
                let path = match rng.below(4) {
                    0 => format!("/v1/purchases/{}", rng.pick(ODD_TEXT)),
                    1 => format!("/v1/skus/{}", rng.pick(ODD_TEXT)),
                    2 => format!(
                        "/v1/purchases/{}?wait={}",
                        RequestId::fresh(),
                        rng.pick(&["-1", "NaN", "1e999", "abc", "inf", ""])
                    ),
                    _ => format!("/v1/{}", rng.pick(ODD_TEXT)),
                };
                ("GET", path, Vec::new())
            }
            _ => {
                let method = rng.pick(&["PUT", "DELETE", "PATCH", "GET"]);
                let path = rng.pick(&["/v1/purchases", "/v1/skus", "/", "/v2/purchases"]);
                (method, path.to_owned(), valid.clone().into_bytes())
            }
        };
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = http
            .request(method, format!("{url}{path}"))
            .body(body.clone());
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        if let Some(key) = key
            && let Ok(value) = reqwest::header::HeaderValue::from_bytes(&key)
        {
            request = request.header("idempotency-key", value);
        }
        let response = request.send().await.unwrap_or_else(|e| {
            panic!(
                "case {case}: the gateway did not answer {path} ({} bytes): {e:?}",
                body.len()
            )
        });
        let status = response.status().as_u16();
        *seen.entry(status).or_default() += 1;
        let problem = response.text().await.unwrap_or_default();
        assert!(
            (400..500).contains(&status)
                || status == 202
                || (status == 200 && path.contains("/v1/skus/")),
            "case {case}: {status} for {path} {:?}: {problem}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        );
        if status == 202 {
            accepted += 1;
        } else if status != 200 {
            let problem: Value = serde_json::from_str(&problem)
                .unwrap_or_else(|_| panic!("case {case}: {status} without a problem body"));
            assert!(
                problem["type"].is_string() && problem["detail"].is_string(),
                "{problem}"
            );
        }
    }
    println!("answers by status: {seen:?}");
    assert!(
        accepted > 0 && seen.len() > 4,
        "the fuzz reached too few paths: {seen:?}"
    );
    assert_eq!(
        p.records_in(&p.purchase_topic()).await.unwrap(),
        accepted,
        "only accepted purchases reached Kafka"
    );
    let health = p.http.get(format!("{url}/healthz")).send().await.unwrap();
    assert!(health.status().is_success());
    p.stop().await;
}
