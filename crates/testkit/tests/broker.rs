//! The local broker over a long life, and the workers when it misbehaves:
//! the stack trims only what every consumer group has read; a broker that
//! stalls past the group session leaves no worker idle while it says it is
//! ready; a killed worker's replacement gets every partition back.
//!
//! Each test runs a broker of its own (`OwnKafka`, started by the stack's
//! own script), because it stops, stalls or restarts it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure here is the test's answer

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flashsale_testkit::flashsale_core::bus::kafka::{self, topic};
use flashsale_testkit::flashsale_core::bus::messages::{self, PurchaseRequest, SCHEMA_VERSION};
use flashsale_testkit::flashsale_core::bus::topic_reader::{self, PartitionRange};
use flashsale_testkit::flashsale_core::ids::{Quantity, RequestId, UserId};
use flashsale_testkit::flashsale_core::service::settings::KafkaSettings;
use flashsale_testkit::flashsale_core::{bus::consumer, clock};
use flashsale_testkit::{OwnKafka, Pipeline, PipelineOptions, eventually};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};

fn settings(broker: &OwnKafka, prefix: &str) -> KafkaSettings {
    KafkaSettings {
        bootstrap: broker.bootstrap(),
        prefix: format!("{prefix}."),
        partitions: 3,
        produce_timeout: Duration::from_secs(10),
        consumer_assignment: "range,roundrobin".into(),
        test_fatal_after: None,
        debug: None,
        replication_factor: 1,
        security: Default::default(),
    }
}

/// Commits `offsets` (partition → next offset to read) for `group`.
fn commit(settings: &KafkaSettings, group: &str, topic: &str, offsets: &[(i32, i64)]) {
    let consumer: BaseConsumer = kafka::base_config(settings)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("a consumer");
    let mut list = TopicPartitionList::new();
    for (partition, offset) in offsets {
        list.add_partition_offset(topic, *partition, Offset::Offset(*offset))
            .expect("an offset");
    }
    consumer
        .commit(&list, CommitMode::Sync)
        .expect("the commit");
}

async fn committed(settings: &KafkaSettings, group: &str, topic: &str) -> Vec<(i32, Option<i64>)> {
    topic_reader::committed(settings, group, topic)
        .await
        .expect("committed offsets")
}

/// Records two groups have read are trimmed, down to the lower of their
/// offsets and never past a partition's newest record; what either group
/// has not read, every header, the committed offsets and a topic no group
/// reads all survive, the stack gave tansu's database its index, and the
/// broker can be trimmed (restarted) again and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimming_keeps_committed_offsets_and_every_unread_record() {
    let name = format!("trim-{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
    let broker = OwnKafka::start(&name).await.expect("a broker of its own");
    let settings = settings(&broker, &name);
    kafka::ensure_topics(&settings).await.unwrap();
    let requests = settings.topic(topic::PURCHASE_REQUESTS);
    let dlq = topic::dead_letter(&requests);

    let producer = kafka::producer(&settings).unwrap();
    let mut produced: HashMap<(i32, i64), String> = HashMap::new();
    for n in 0..90 {
        let payload = format!("record-{n}");
        let (partition, offset) = kafka::send(
            &producer,
            &requests,
            &format!("key-{n}"),
            payload.as_bytes(),
            kafka::headers_with_trace(&format!("00-{n:032x}-{:016x}-01", n + 1)),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        produced.insert((partition, offset), payload);
    }
    for n in 0..5 {
        kafka::send(
            &producer,
            &dlq,
            "poison",
            format!("dead-{n}").as_bytes(),
            kafka::headers_with_trace(&format!("00-{:032x}-{:016x}-01", n + 100, n + 1)),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    }
    let before = topic_reader::watermarks(&settings, &requests)
        .await
        .unwrap();
    assert!(
        before.iter().all(|r| r.low == 0 && r.high >= 10),
        "every partition got records: {before:?}"
    );
    // `fast` has read everything; `slow` half of partitions 0 and 1, and all
    // of partition 2.
    let high: HashMap<i32, i64> = before.iter().map(|r| (r.partition, r.high)).collect();
    let fast: Vec<(i32, i64)> = (0..3).map(|p| (p, high[&p])).collect();
    let slow: Vec<(i32, i64)> = vec![(0, high[&0] / 2), (1, high[&1] / 2), (2, high[&2])];
    let (fast_group, slow_group) = (settings.group("fast"), settings.group("slow"));
    commit(&settings, &fast_group, &requests, &fast);
    commit(&settings, &slow_group, &requests, &slow);

    broker.stack(&["trim"]).await.expect("stack.sh trim");
    // And again: a broker started under the restart lock once kept it, and
    // every later restart (a trim, the keeper's) waited for it forever.
    tokio::time::timeout(Duration::from_secs(60), broker.stack(&["trim"]))
        .await
        .expect("a second trim is not locked out")
        .expect("stack.sh trim");

    let after = topic_reader::watermarks(&settings, &requests)
        .await
        .unwrap();
    let expected_low: HashMap<i32, i64> =
        [(0, high[&0] / 2), (1, high[&1] / 2), (2, high[&2] - 1)].into();
    for range in &after {
        assert_eq!(
            (range.low, range.high),
            (expected_low[&range.partition], high[&range.partition]),
            "partition {}: trimmed to what both groups read, the newest record kept",
            range.partition
        );
    }
    for (group, offsets) in [(&fast_group, &fast), (&slow_group, &slow)] {
        let kept: Vec<(i32, Option<i64>)> = offsets.iter().map(|(p, o)| (*p, Some(*o))).collect();
        assert_eq!(
            committed(&settings, group, &requests).await,
            kept,
            "{group}"
        );
    }
    let survivors =
        topic_reader::read(&settings, &requests, after.clone(), Duration::from_secs(30))
            .await
            .unwrap();
    let kept: usize = after.iter().map(|r| (r.high - r.low) as usize).sum();
    assert_eq!(survivors.len(), kept);
    for record in &survivors {
        let payload = String::from_utf8_lossy(record.payload().unwrap_or_default()).into_owned();
        assert_eq!(
            Some(&payload),
            produced.get(&(record.partition(), record.offset())),
            "the record at {}/{}",
            record.partition(),
            record.offset()
        );
        let headers = record.headers().expect("its headers survive");
        assert_eq!(headers.count(), 1);
    }
    let dead = topic_reader::watermarks(&settings, &dlq).await.unwrap();
    assert_eq!(
        dead.iter().map(|r| r.high - r.low).sum::<i64>(),
        5,
        "a topic no group reads is kept whole: {dead:?}"
    );
    let index = std::process::Command::new("sqlite3")
        .arg(broker.database())
        .arg("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'header'")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&index.stdout).contains("header_topition_offset"),
        "the stack indexes tansu's headers"
    );
}

/// `GET /readyz` of a worker: its status code and body.
async fn readyz(http: &reqwest::Client, base: &str) -> (u16, String) {
    match http
        .get(format!("{base}/readyz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
    {
        Ok(response) => (
            response.status().as_u16(),
            response.text().await.unwrap_or_default(),
        ),
        Err(error) => (0, error.to_string()),
    }
}

/// Buys one unit as `user`, asking again (same key) until the gateway
/// queues it; the request id.
async fn buy_until_queued(p: &Pipeline, sku: &str, user: &str) -> String {
    eventually(
        "the purchase to be queued",
        Duration::from_secs(90),
        || async {
            match p.try_buy(sku, user, Some(user)).await {
                Ok((202, body)) => body["request_id"].as_str().map(str::to_owned),
                _ => None,
            }
        },
    )
    .await
}

/// The broker stops answering (SIGSTOP) for longer than the group session
/// during a sale, then comes back. Without restarting any worker, every
/// purchase accepted before, during and after ends terminal, the audit is
/// clean, no worker answered `/readyz` 200 while the broker was stalled or
/// while it held no partition with records waiting, and both were back in
/// their groups, ready, at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_broker_leaves_no_worker_idle_while_ready() {
    let p = Arc::new(
        Pipeline::start(PipelineOptions {
            own_kafka: true,
            env: vec![("FLASHSALE_CONSUMER_STALL_MS", "6000".into())],
            ..Default::default()
        })
        .await
        .expect("pipeline starts"),
    );
    let sku = p.sku("stall");
    p.create_sale(&sku, 60, 1).await.unwrap();
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(buy_until_queued(&p, sku.as_str(), &format!("{}-before-{n}", p.prefix)).await);
    }
    for id in &ids {
        assert!(p.terminal(id).await.status.is_terminal());
    }

    // Every 200 ms, each worker's /readyz, with when it was asked.
    let sampling = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let stop = sampling.clone();
        let (http, workers) = (p.http.clone(), p.worker_metrics.clone());
        tokio::spawn(async move {
            let mut samples: Vec<(Instant, usize, u16, String)> = Vec::new();
            while !stop.is_cancelled() {
                let asked = Instant::now();
                let answers =
                    futures::future::join_all(workers.iter().map(|base| readyz(&http, base))).await;
                for (n, (status, body)) in answers.into_iter().enumerate() {
                    samples.push((asked, n, status, body));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            samples
        })
    };

    let broker = p.broker.as_ref().expect("own broker");
    let stalled_at = Instant::now();
    broker.pause().unwrap();
    // Buyers keep coming while the broker is stalled; they are told to
    // retry (503) and do.
    let during: Vec<_> = (0..10)
        .map(|n| {
            let (p, sku) = (p.clone(), sku.to_string());
            tokio::spawn(async move {
                buy_until_queued(&p, &sku, &format!("{}-during-{n}", p.prefix)).await
            })
        })
        .collect();
    tokio::time::sleep(consumer::SESSION_TIMEOUT + Duration::from_secs(3)).await;
    let resumed_at = Instant::now();
    broker.resume().unwrap();
    for buyer in during {
        ids.push(buyer.await.unwrap());
    }
    for n in 0..10 {
        ids.push(buy_until_queued(&p, sku.as_str(), &format!("{}-after-{n}", p.prefix)).await);
    }
    for id in &ids {
        let settled = p.terminal(id).await;
        assert!(settled.status.is_terminal(), "{id}: {settled:?}");
    }
    // Both workers back in their groups and ready.
    for base in &p.worker_metrics {
        eventually(
            "the worker ready again",
            Duration::from_secs(60),
            || async {
                let (status, body) = readyz(&p.http, base).await;
                (status == 200 && !body.contains(" 0 partitions")).then_some(())
            },
        )
        .await;
    }
    sampling.cancel();
    let samples = sampler.await.unwrap();

    let stall = (stalled_at + Duration::from_secs(1), resumed_at);
    let mut asked_during_stall = 0;
    for (asked, worker, status, body) in &samples {
        if *asked > stall.0 && *asked < stall.1 {
            asked_during_stall += 1;
            assert_ne!(
                *status, 200,
                "worker {worker} ready while the broker was stalled: {body}"
            );
        }
        if *status == 200 && body.contains(" 0 partitions") {
            assert!(
                body.contains(" 0 records unread"),
                "worker {worker} ready while out of its group with records waiting: {body}"
            );
        }
    }
    assert!(
        asked_during_stall >= 2 * p.worker_metrics.len(),
        "the stall was sampled: {asked_during_stall} answers"
    );
    let report = p.stores.audit(&sku, true).await.unwrap();
    assert!(report.ok(), "{:?}", report.violations);
    match Arc::try_unwrap(p) {
        Ok(p) => p.stop().await,
        Err(_) => panic!("the pipeline is still shared"),
    }
}

/// One purchase request straight onto `partition` of the purchase topic
/// (as the gateway would put it there), for a sale that exists.
async fn request_on(p: &Pipeline, sku: &str, partition: i32, n: usize) {
    let request = PurchaseRequest {
        v: SCHEMA_VERSION,
        request_id: RequestId::fresh(),
        sku: flashsale_testkit::flashsale_core::ids::Sku::parse(sku).unwrap(),
        user_id: UserId::parse(&format!("{}-direct-{n}", p.prefix)).unwrap(),
        quantity: Quantity::new(1).unwrap(),
        accepted_at_ms: clock::now_ms(),
    };
    let payload = messages::encode(&request);
    let producer = p.producer().unwrap();
    let topic = p.purchase_topic();
    let headers = kafka::trace_headers(request.request_id);
    producer
        .send(
            FutureRecord::to(&topic)
                .key(sku)
                .partition(partition)
                .payload(&payload)
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

/// A shop-worker process is killed (SIGKILL: no goodbye to its group) and
/// its replacement started at once, as an operator replacing a dead
/// worker does. Records are waiting on every partition; the time until the
/// group has committed past all of them is printed (it is the figure
/// README reports) and must stay within two sessions and a stall bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_workers_replacement_consumes_every_partition_again() {
    let stall = Duration::from_secs(5);
    let p = Pipeline::start(PipelineOptions {
        own_kafka: true,
        shop_workers: 0,
        env: vec![("FLASHSALE_CONSUMER_STALL_MS", stall.as_millis().to_string())],
        ..Default::default()
    })
    .await
    .expect("pipeline starts");
    let sku = p.sku("replaced");
    p.create_sale(&sku, 100, 1).await.unwrap();
    let group = p.kafka.group(kafka::group::SHOP);
    let requests = p.purchase_topic();
    let consumed_all = |targets: Vec<PartitionRange>| {
        let (settings, group, requests) = (p.kafka.clone(), group.clone(), requests.clone());
        async move {
            let committed = topic_reader::committed(&settings, &group, &requests)
                .await
                .ok()?;
            targets
                .iter()
                .all(|t| {
                    committed
                        .iter()
                        .any(|(p, c)| *p == t.partition && c.is_some_and(|c| c >= t.high))
                })
                .then_some(())
        }
    };

    let mut doomed = p.service_process("shop-worker", &[]);
    for partition in 0..3 {
        request_on(&p, sku.as_str(), partition, partition as usize).await;
    }
    let first = topic_reader::watermarks(&p.kafka, &requests).await.unwrap();
    eventually(
        "the first worker to consume",
        Duration::from_secs(60),
        || consumed_all(first.clone()),
    )
    .await;

    doomed.kill();
    let replaced_at = Instant::now();
    let _replacement = p.service_process("shop-worker", &[]);
    for partition in 0..3 {
        request_on(&p, sku.as_str(), partition, 10 + partition as usize).await;
    }
    let waiting = topic_reader::watermarks(&p.kafka, &requests).await.unwrap();
    eventually(
        "the replacement to consume every partition",
        Duration::from_secs(120),
        || consumed_all(waiting.clone()),
    )
    .await;
    let took = replaced_at.elapsed();
    eprintln!(
        "replacement consumed every partition {:.1} s after the kill",
        took.as_secs_f64()
    );
    assert!(
        took < consumer::SESSION_TIMEOUT * 2 + stall + Duration::from_secs(10),
        "took {took:?}"
    );
    p.stop().await;
}

/// #14 item 3: a worker asked to stop (SIGTERM) while its broker does not
/// answer (SIGSTOPped) still exits, with status 0, within its drain timeout
/// and a few seconds, rather than hang in librdkafka's close.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_stops_in_bounded_time_with_its_broker_stalled() {
    let p = Pipeline::start(PipelineOptions {
        own_kafka: true,
        shop_workers: 0,
        order_workers: 0,
        ..Default::default()
    })
    .await
    .expect("pipeline starts");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut worker = p.service_process(
        "order-worker",
        &[("FLASHSALE_ORDER_METRICS_ADDR", addr.clone())],
    );
    eventually("the worker ready", Duration::from_secs(60), || async {
        let ready = p
            .http
            .get(format!("http://{addr}/readyz"))
            .send()
            .await
            .ok()?;
        ready.status().is_success().then_some(())
    })
    .await;
    let broker = p.broker.as_ref().expect("own broker");
    broker.pause().unwrap();
    let asked = Instant::now();
    worker.terminate();
    // The order-worker drains for up to 30 s, and closing its consumer may
    // take 10 s more.
    let bound = Duration::from_secs(45);
    let status = eventually("the worker to exit", bound, || {
        let exited = worker.exited();
        async move { exited }
    })
    .await;
    broker.resume().unwrap();
    eprintln!(
        "exited {:?} after SIGTERM with the broker stalled",
        asked.elapsed()
    );
    assert!(status.success(), "{status:?}");
}

/// The broker stalls (SIGSTOP) for longer than the gateway's request
/// timeout while buyers without an Idempotency-Key keep coming; then it
/// resumes and delivers what it had taken. A purchase whose buyer was
/// answered with a failure is never processed: no order, no charge. The
/// ones answered `202` are.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_purchase_answered_with_a_failure_is_never_processed_later() {
    let p = Arc::new(
        Pipeline::start(PipelineOptions {
            own_kafka: true,
            env: vec![
                // The gateway gives up on the broker before its producer does.
                ("FLASHSALE_GATEWAY_REQUEST_TIMEOUT_MS", "1500".into()),
                ("FLASHSALE_KAFKA_PRODUCE_TIMEOUT_MS", "20000".into()),
                ("FLASHSALE_GATEWAY_USER_RPS", "0".into()),
            ],
            ..Default::default()
        })
        .await
        .expect("pipeline starts"),
    );
    let sku = p.sku("unanswered");
    p.create_sale(&sku, 100, 1).await.unwrap();
    let mut accepted = 0;
    for n in 0..3 {
        let (status, body) = p
            .buy(sku.as_str(), &format!("{}-early{n}", p.prefix), None)
            .await;
        assert_eq!(status, 202, "{body}");
        accepted += 1;
    }
    let broker = p.broker.as_ref().expect("own broker");
    broker.pause().unwrap();
    // One buyer with a key, who will ask again once the broker is back.
    let retrier = format!("{}-retrier", p.prefix);
    let keyed = {
        let (p, sku, retrier) = (p.clone(), sku.to_string(), retrier.clone());
        tokio::spawn(async move { p.try_buy(&sku, &retrier, Some(&retrier)).await })
    };
    let buyers: Vec<_> = (0..12)
        .map(|n| {
            let (p, sku) = (p.clone(), sku.to_string());
            tokio::spawn(async move { p.try_buy(&sku, &format!("{}-u{n}", p.prefix), None).await })
        })
        .collect();
    let mut failed = 0;
    for buyer in buyers {
        match buyer.await.expect("a buyer") {
            Ok((202, _)) => accepted += 1,
            Ok((status, body)) => {
                assert!(status >= 500, "{status}: {body}");
                failed += 1;
            }
            Err(error) => panic!("the gateway did not answer: {error}"),
        }
    }
    let (status, body) = keyed.await.expect("the keyed buyer").expect("an answer");
    assert!(status >= 500, "{status}: {body}");
    broker.resume().unwrap();
    assert!(failed > 0, "the stall outlasted no request");
    // Asked again with the same key, the purchase is taken and processed.
    let (status, body) = eventually("the retry taken", Duration::from_secs(30), || async {
        p.try_buy(sku.as_str(), &retrier, Some(&retrier))
            .await
            .ok()
            .filter(|(status, _)| *status == 202)
    })
    .await;
    let id = body["request_id"].as_str().expect("request id").to_owned();
    assert_eq!(status, 202);
    assert_eq!(p.terminal(&id).await.status.as_str(), "confirmed");
    accepted += 1;
    // Everything the broker had taken is delivered and worked through.
    eventually("the pipeline at rest", Duration::from_secs(90), || async {
        let records = p.records_in(&p.purchase_topic()).await.ok()?;
        let done = p
            .committed(kafka::group::SHOP, &p.purchase_topic())
            .await
            .ok()?;
        let reservations = p.records_in(&p.topic(topic::RESERVATIONS)).await.ok()?;
        let orders_done = p
            .committed(kafka::group::ORDERS, &p.topic(topic::RESERVATIONS))
            .await
            .ok()?;
        (records > 0 && done == records && orders_done == reservations).then_some(())
    })
    .await;
    let (_, orders, charges) = p.sale_books(&sku).await.unwrap();
    eprintln!(
        "{accepted} accepted, {failed} answered with a failure; {} orders, {} charges",
        orders.len(),
        charges.len()
    );
    assert_eq!(
        orders.len(),
        accepted,
        "orders for purchases answered with a failure"
    );
    assert_eq!(charges.len(), accepted);
}
