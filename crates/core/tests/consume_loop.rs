//! The consumer loop against the real broker (the test stack's, started by
//! `./scripts/test`): a message whose work fails is never committed past,
//! even when later messages of its partition succeed.

use std::sync::Arc;
use std::time::Duration;

use flashsale_core::consume::{self, Abandoned, Completion, ConsumerOptions, Handler};
use flashsale_core::consumer_health::ConsumerHealth;
use flashsale_core::kafka::{self, topic};
use flashsale_core::settings::{Env, KafkaSettings};
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
        consume::run(
            consume::consumer(&opts).expect("consumer"),
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
            let consumer = consume::consumer(&opts).expect("consumer");
            consume::run(consumer, second, &opts, shutdown).await
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
