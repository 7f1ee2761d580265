//! The consumer loop against the real broker (the test stack's, started by
//! `./scripts/test`): a message whose work fails is never committed past,
//! even when later messages of its partition succeed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure here is the test's answer

use std::sync::Arc;
use std::time::Duration;

use flashsale_core::bus::consumer::{self, Abandoned, Completion, ConsumerOptions, Handler};
use flashsale_core::bus::consumer_health::ConsumerHealth;
use flashsale_core::bus::kafka::{self, topic};
use flashsale_core::service::settings::{Env, KafkaSettings};
use rdkafka::message::{Message, OwnedMessage};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

fn settings() -> KafkaSettings {
    let prefix = format!("c{}.", &uuid::Uuid::now_v7().simple().to_string()[20..]);
    let mut settings = KafkaSettings::from_env(&Env::process()).expect("settings");
    settings.prefix = prefix;
    settings
}

fn options(kafka: &KafkaSettings) -> ConsumerOptions {
    ConsumerOptions {
        kafka: kafka.clone(),
        group: kafka.group("loop"),
        topics: vec![kafka.topic(topic::PURCHASE_REQUESTS)],
        max_in_flight: 32,
        drain_timeout: Duration::from_secs(10),
        pause: None,
        stall_after: Duration::from_secs(60),
        health: ConsumerHealth::register(&prometheus::Registry::new()).expect("metrics"),
    }
}

/// A member of `opts`'s group running `handler` until `shutdown`.
fn spawn_member<H: Handler>(
    opts: ConsumerOptions,
    handler: H,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<Result<(), Abandoned>> {
    tokio::spawn(async move {
        let consumer = consumer::consumer(&opts).expect("consumer");
        consumer::run(consumer, handler, &opts, shutdown).await
    })
}

/// Fails the work of the message whose payload is `fail`, after the later
/// ones have finished theirs; passes on every payload it is given.
struct Flaky {
    fail: Option<String>,
    seen: mpsc::UnboundedSender<String>,
    later_done: Arc<Notify>,
}

impl Handler for Flaky {
    async fn start(&self, message: OwnedMessage) -> Result<Completion, Abandoned> {
        let payload = String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned();
        let _ = self.seen.send(payload.clone());
        let (fail, later_done) = (self.fail.clone(), self.later_done.clone());
        Ok(Box::pin(async move {
            if fail.as_deref() == Some(payload.as_str()) {
                // Let every later message of the partition finish first
                // (m9's work notifies; a lost notification only makes the
                // test weaker, never wrong).
                let _ = tokio::time::timeout(Duration::from_secs(2), later_done.notified()).await;
                return Err(Abandoned(format!("{payload} failed")));
            }
            if payload == "m9" {
                later_done.notify_one();
            }
            Ok(())
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_message_is_delivered_again_after_later_ones_succeeded() {
    let kafka = settings();
    kafka::ensure_topics(&kafka).await.expect("topics");
    let producer = kafka::producer(&kafka).expect("producer");
    let topic = kafka.topic(topic::PURCHASE_REQUESTS);
    // One key: one partition, in this order.
    for n in 0..10 {
        kafka::send(
            &producer,
            &topic,
            "one-sku",
            format!("m{n}").as_bytes(),
            kafka::headers_with_trace("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            kafka.produce_timeout,
        )
        .await
        .expect("produced");
    }

    // The first run: m3's work fails while m4..m9 succeed; the loop stops.
    let (seen, mut given) = mpsc::unbounded_channel();
    let first = Flaky {
        fail: Some("m3".into()),
        seen,
        later_done: Arc::new(Notify::new()),
    };
    let opts = options(&kafka);
    let stopped = tokio::time::timeout(
        Duration::from_secs(60),
        consumer::run(
            consumer::consumer(&opts).expect("consumer"),
            first,
            &opts,
            CancellationToken::new(),
        ),
    )
    .await
    .expect("the loop stops on its own");
    assert!(stopped.is_err(), "a failed message stops the loop");
    let mut all = Vec::new();
    while let Ok(payload) = given.try_recv() {
        all.push(payload);
    }
    assert_eq!(all.len(), 10, "{all:?}");

    // The restarted member starts again at m3, not after m9.
    let (seen, mut given) = mpsc::unbounded_channel();
    let second = Flaky {
        fail: None,
        seen,
        later_done: Arc::new(Notify::new()),
    };
    let shutdown = CancellationToken::new();
    let running = {
        let (opts, shutdown) = (options(&kafka), shutdown.clone());
        tokio::spawn(async move {
            let consumer = consumer::consumer(&opts).expect("consumer");
            consumer::run(consumer, second, &opts, shutdown).await
        })
    };
    // The first member left its group cleanly: the second joins at once.
    let first_seen = tokio::time::timeout(Duration::from_secs(30), given.recv())
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| "nothing: every message was committed, m3 included".into());
    shutdown.cancel();
    running.await.expect("joined").expect("stopped cleanly");
    assert_eq!(first_seen, "m3", "m3 was committed past");
}

/// Work that takes a while, reporting which member did it.
struct Slow {
    member: &'static str,
    done: mpsc::UnboundedSender<(&'static str, String)>,
}

impl Handler for Slow {
    async fn start(&self, message: OwnedMessage) -> Result<Completion, Abandoned> {
        let payload = String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned();
        let (member, done) = (self.member, self.done.clone());
        Ok(Box::pin(async move {
            // The work itself: long enough to be in flight when the
            // partition is taken away.
            tokio::time::sleep(Duration::from_millis(4000)).await;
            let _ = done.send((member, payload));
            Ok(())
        }))
    }
}

async fn produce(kafka: &KafkaSettings, from: usize, to: usize, every: Duration) {
    let producer = kafka::producer(kafka).expect("producer");
    for n in from..to {
        tokio::time::sleep(every).await;
        kafka::send(
            &producer,
            &kafka.topic(topic::PURCHASE_REQUESTS),
            &format!("key-{n}"),
            format!("m{n}").as_bytes(),
            kafka::headers_with_trace("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            kafka.produce_timeout,
        )
        .await
        .expect("produced");
    }
}

/// A second member joins while the first has work in flight on every
/// partition: the partitions that move are handed over only once their
/// work finished and its offsets are committed, so the new owner starts
/// after it, and no message is worked on twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitions_taken_away_are_finished_and_committed_before_they_move() {
    handed_over_settled("range,roundrobin").await;
}

/// The same with the cooperative assignor: only the partitions that move
/// are revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cooperatively_moved_partitions_are_finished_and_committed_before_they_move() {
    handed_over_settled("cooperative-sticky").await;
}

async fn handed_over_settled(assignment: &str) {
    let mut kafka = settings();
    kafka.consumer_assignment = assignment.to_owned();
    kafka::ensure_topics(&kafka).await.expect("topics");
    produce(&kafka, 0, 12, Duration::ZERO).await;
    let (done, mut finished) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let member = |name: &'static str| {
        let (opts, shutdown, done) = (options(&kafka), shutdown.clone(), done.clone());
        tokio::spawn(async move {
            let consumer = consumer::consumer(&opts).expect("consumer");
            let handler = Slow { member: name, done };
            consumer::run(consumer, handler, &opts, shutdown).await
        })
    };
    let first = member("first");
    let mut handled: Vec<(&'static str, String)> = Vec::new();
    // The first member is at work (its first messages are done, the rest
    // in flight) when the second joins.
    let one = tokio::time::timeout(Duration::from_secs(30), finished.recv())
        .await
        .expect("the first member works")
        .expect("a message");
    handled.push(one);
    let second = member("second");
    let total = 60;
    // A steady flow: work is in flight whenever the rebalance comes.
    let flow = {
        let kafka = kafka.clone();
        tokio::spawn(async move { produce(&kafka, 12, total, Duration::from_millis(100)).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let distinct: std::collections::HashSet<&String> = handled.iter().map(|(_, p)| p).collect();
        if distinct.len() == total {
            break;
        }
        match tokio::time::timeout_at(deadline, finished.recv()).await {
            Ok(Some(one)) => handled.push(one),
            _ => panic!("only {} of {total} messages were handled", distinct.len()),
        }
    }
    flow.await.expect("produced");
    shutdown.cancel();
    first
        .await
        .expect("joined")
        .expect("the first stopped cleanly");
    second
        .await
        .expect("joined")
        .expect("the second stopped cleanly");
    while let Ok(one) = finished.try_recv() {
        handled.push(one);
    }
    let mut by_payload: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for (member, payload) in &handled {
        by_payload.entry(payload).or_default().push(member);
    }
    let twice: Vec<_> = by_payload.iter().filter(|(_, by)| by.len() > 1).collect();
    assert!(twice.is_empty(), "worked on twice: {twice:?}");
    let by_second = handled.iter().filter(|(m, _)| *m == "second").count();
    assert!(by_second > 0, "no partition moved to the second member");
    eprintln!("first {}, second {by_second}", handled.len() - by_second);
}

/// The value of `name` with all of `labels` in `registry`, if exported.
fn sample(registry: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let family = registry
        .gather()
        .into_iter()
        .find(|family| family.name() == name)?;
    let metric = family.get_metric().iter().find(|metric| {
        labels.iter().all(|(key, value)| {
            metric
                .get_label()
                .iter()
                .any(|pair| pair.name() == *key && pair.value() == *value)
        })
    })?;
    match family.get_field_type() {
        prometheus::proto::MetricType::GAUGE => Some(metric.get_gauge().get_value()),
        prometheus::proto::MetricType::COUNTER => Some(metric.get_counter().get_value()),
        _ => None,
    }
}

/// A member with a backlog exports, as kafka-lag-exporter names them, the
/// lag of the partitions it owns in records and in seconds, and its
/// rebalances, work in flight and messages handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_exports_its_lag_rebalances_and_work_for_autoscalers() {
    let kafka = settings();
    kafka::ensure_topics(&kafka).await.expect("topics");
    produce(&kafka, 0, 8, Duration::ZERO).await;
    let registry = prometheus::Registry::new();
    let mut opts = options(&kafka);
    opts.health = ConsumerHealth::register(&registry).expect("metrics");
    // One at a time, slowly: a backlog stays for a while.
    opts.max_in_flight = 1;
    let group = opts.group.clone();
    let topic = kafka.topic(topic::PURCHASE_REQUESTS);
    let (done, _finished) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let running = spawn_member(
        opts,
        Slow {
            member: "only",
            done,
        },
        shutdown.clone(),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (lag, lag_seconds) = loop {
        let lag: f64 = (0..kafka.partitions)
            .filter_map(|p| {
                let p = p.to_string();
                sample(
                    &registry,
                    "kafka_consumergroup_group_lag",
                    &[("group", &group), ("topic", &topic), ("partition", &p)],
                )
            })
            .sum();
        let oldest = (0..kafka.partitions)
            .filter_map(|p| {
                let p = p.to_string();
                sample(
                    &registry,
                    "kafka_consumergroup_group_lag_seconds",
                    &[("group", &group), ("partition", &p)],
                )
            })
            .fold(0.0, f64::max);
        if lag > 0.0 && oldest > 0.0 {
            break (lag, oldest);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no lag exported: {:?}",
            registry
                .gather()
                .iter()
                .map(|f| f.name().to_owned())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(lag <= 8.0, "{lag}");
    assert!(lag_seconds < 60.0, "{lag_seconds}");
    assert_eq!(
        sample(&registry, "consumer_in_flight_messages", &[]),
        Some(1.0)
    );
    assert!(sample(&registry, "consumer_rebalances_total", &[]) >= Some(1.0));
    assert!(
        sample(
            &registry,
            "consumer_messages_total",
            &[("outcome", "succeeded")]
        ) >= Some(1.0),
        "the lag is read every 5 s; a message of 4 s is done by then"
    );
    shutdown.cancel();
    running.await.expect("joined").expect("stopped cleanly");
    assert_eq!(
        sample(&registry, "consumer_in_flight_messages", &[]),
        Some(0.0)
    );
}

/// A group keeps the kind of assignor it began with (tansu 0.6 refuses
/// the other kind for good): a member configured with the other kind joins
/// speaking the group's, and consumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_joins_a_group_that_speaks_the_other_assignor() {
    let mut eager = settings();
    eager.consumer_assignment = "range,roundrobin".into();
    kafka::ensure_topics(&eager).await.expect("topics");
    produce(&eager, 0, 1, Duration::ZERO).await;
    let (done, mut finished) = mpsc::unbounded_channel();
    let first = {
        let (opts, done) = (options(&eager), done.clone());
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let running = tokio::spawn(async move {
            let consumer = consumer::consumer(&opts).expect("consumer");
            consumer::run(
                consumer,
                Slow {
                    member: "eager",
                    done,
                },
                &opts,
                shutdown,
            )
            .await
        });
        (running, stop)
    };
    let one = tokio::time::timeout(Duration::from_secs(30), finished.recv())
        .await
        .expect("the eager member consumes")
        .expect("a message");
    assert_eq!(one.0, "eager");
    first.1.cancel();
    first.0.await.expect("joined").expect("stopped cleanly");

    let mut cooperative = eager.clone();
    cooperative.consumer_assignment = "cooperative-sticky".into();
    produce(&cooperative, 1, 2, Duration::ZERO).await;
    let opts = options(&cooperative);
    let shutdown = CancellationToken::new();
    let running = spawn_member(
        opts,
        Slow {
            member: "switched",
            done,
        },
        shutdown.clone(),
    );
    let two = tokio::time::timeout(Duration::from_secs(60), finished.recv())
        .await
        .expect("the member configured for the other assignor consumes")
        .expect("a message");
    assert_eq!(two, ("switched", "m1".to_owned()));
    shutdown.cancel();
    running.await.expect("joined").expect("stopped cleanly");
}
