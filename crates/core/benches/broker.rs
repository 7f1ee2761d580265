//! How the Kafka broker holds up as its history grows. Run by
//! `./scripts/bench-broker`, which starts a broker of its own.
//!
//! The topic is the pipeline's own `purchase-requests` (its partitions, its
//! key, a purchase-sized JSON payload and a `traceparent` header on every
//! record, as the gateway sends them). At each history size it measures,
//! with a consumer group attached the way a worker is:
//!
//! * **produce**: records/s from an idempotent `acks=all` producer with up
//!   to 1,024 sends in flight (the gateway's cap), while the attached group
//!   consumes them and commits;
//! * **attached**: records/s the attached group consumed, from the first
//!   send to the last record it read (it keeps up, or the broker does not);
//! * **catch-up**: records/s a new group member reads the same records at,
//!   from their first offset (a worker with a backlog);
//! * **producer id**: how long a new idempotent producer takes from its
//!   creation to its first acknowledged send (metadata, InitProducerId and
//!   one produce), the median and the worst of five.
//!
//! Between stages, a bulk producer fills the topic to the next history
//! size. Every phase has a deadline: a broker that stalls gives a figure
//! computed over what it did in that time, marked `timed_out`, not a hang.
//!
//! Prints one JSON object per history size.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark stops at its first failure

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flashsale_core::bus::kafka::{self, base_config, topic};
use flashsale_core::service::settings::{Env, KafkaSettings};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const IN_FLIGHT: usize = 1024;
const PHASE_DEADLINE: Duration = Duration::from_secs(90);
const SKUS: [&str; 3] = ["tv", "phone", "console"];

fn arg(name: &str, default: &str) -> String {
    let flag = format!("--{name}=");
    std::env::args()
        .find_map(|a| a.strip_prefix(&flag).map(str::to_owned))
        .unwrap_or_else(|| default.to_owned())
}

fn payload(n: u64) -> (String, Vec<u8>, String) {
    let sku = SKUS[(n % SKUS.len() as u64) as usize];
    let id = uuid::Uuid::now_v7();
    let body = serde_json::json!({
        "v": 1,
        "request_id": id,
        "sku": sku,
        "user_id": format!("user-{n}"),
        "quantity": 1,
        "accepted_at_ms": flashsale_core::clock::now_ms(),
    });
    (
        sku.to_owned(),
        body.to_string().into_bytes(),
        format!("00-{}-{:016x}-01", id.simple(), n | 1),
    )
}

/// Sends `count` records with up to `in_flight` unacknowledged; returns how
/// many were acknowledged before `deadline` and how many sends failed (a
/// broker that stops answering times them out).
async fn produce(
    producer: &FutureProducer,
    topic: &str,
    count: u64,
    in_flight: usize,
    deadline: Instant,
) -> (u64, u64) {
    let mut pending = FuturesUnordered::new();
    let mut sent = 0u64;
    let mut acked = 0u64;
    let mut failed = 0u64;
    while acked + failed < count {
        if Instant::now() > deadline {
            break;
        }
        while sent < count && pending.len() < in_flight {
            let (key, body, traceparent) = payload(sent);
            let producer = producer.clone();
            let topic = topic.to_owned();
            pending.push(async move {
                let record = FutureRecord::to(&topic)
                    .key(&key)
                    .payload(&body)
                    .headers(kafka::headers_with_trace(&traceparent));
                producer
                    .send(record, Duration::from_secs(30))
                    .await
                    .map(|_| ())
                    .map_err(|(e, _)| e)
            });
            sent += 1;
        }
        match tokio::time::timeout(Duration::from_secs(1), pending.next()).await {
            Ok(Some(Ok(()))) => acked += 1,
            Ok(Some(Err(_))) => failed += 1,
            Ok(None) | Err(_) => {}
        }
    }
    (acked, failed)
}

fn producer(settings: &KafkaSettings, linger_ms: u32) -> anyhow::Result<FutureProducer> {
    Ok(base_config(settings)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", linger_ms.to_string())
        // As the services do (`kafka::producer`): librdkafka never times a
        // message out, which would make tansu 0.6 fail (see there).
        .set("message.timeout.ms", "0")
        .create()?)
}

/// A member of a consumer group on `topic`, in a thread of its own, that
/// reads from where the group is (new groups: the end), stores what it read
/// and lets librdkafka commit it, as the workers do.
struct Attached {
    read: Arc<AtomicU64>,
    assigned: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Attached {
    fn start(settings: &KafkaSettings, group: &str, topic: &str) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = base_config(settings)
            .set("group.id", group)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "500")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "latest")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .set("fetch.wait.max.ms", "50")
            .create()?;
        consumer.subscribe(&[topic])?;
        let read = Arc::new(AtomicU64::new(0));
        let assigned = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (read, assigned, stop) = (read.clone(), assigned.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
                        let _ = consumer.store_offset_from_message(&message);
                        read.fetch_add(1, Ordering::Relaxed);
                    }
                    if !assigned.load(Ordering::Relaxed)
                        && consumer.assignment().is_ok_and(|a| a.count() > 0)
                    {
                        assigned.store(true, Ordering::Relaxed);
                    }
                }
                let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
                consumer.unsubscribe();
            })
        };
        Ok(Self {
            read,
            assigned,
            stop,
            thread: Some(thread),
        })
    }

    async fn wait_assigned(&self, deadline: Duration) -> bool {
        let until = Instant::now() + deadline;
        while Instant::now() < until {
            if self.assigned.load(Ordering::Relaxed) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(work).await?
}

async fn high_watermarks(settings: &KafkaSettings, topic: &str) -> anyhow::Result<Vec<i64>> {
    let config = base_config(settings);
    let (topic, partitions) = (topic.to_owned(), settings.partitions);
    blocking(move || {
        let client: BaseConsumer = config.create()?;
        (0..partitions)
            .map(|p| {
                Ok(client
                    .fetch_watermarks(&topic, p, Duration::from_secs(30))?
                    .1)
            })
            .collect()
    })
    .await
}

/// Reads the records from `from` (per partition) until `count` arrived or
/// the deadline passed; returns how many and how long.
async fn catch_up(
    config: ClientConfig,
    topic: &str,
    from: Vec<i64>,
    count: u64,
) -> anyhow::Result<(u64, Duration)> {
    let topic = topic.to_owned();
    blocking(move || {
        let consumer: BaseConsumer = config.create()?;
        let mut assignment = TopicPartitionList::new();
        for (partition, offset) in from.iter().enumerate() {
            assignment.add_partition_offset(&topic, partition as i32, Offset::Offset(*offset))?;
        }
        consumer.assign(&assignment)?;
        let started = Instant::now();
        let mut read = 0u64;
        while read < count && started.elapsed() < PHASE_DEADLINE {
            if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
                read += 1;
            }
        }
        Ok((read, started.elapsed()))
    })
    .await
}

/// How long a new producer took to its first acknowledgement, or to give
/// up (`false`).
async fn first_ack(settings: &KafkaSettings, topic: &str) -> anyhow::Result<(Duration, bool)> {
    let started = Instant::now();
    let producer = producer(settings, 1)?;
    let (key, body, traceparent) = payload(0);
    let send = producer.send(
        FutureRecord::to(topic)
            .key(&key)
            .payload(&body)
            .headers(kafka::headers_with_trace(&traceparent)),
        Duration::from_secs(60),
    );
    let acked = matches!(
        tokio::time::timeout(Duration::from_secs(60), send).await,
        Ok(Ok(_))
    );
    Ok((started.elapsed(), acked))
}

fn per_second(count: u64, took: Duration) -> f64 {
    count as f64 / took.as_secs_f64().max(1e-6)
}

/// One measurement at `history` records; the report and how many records
/// it added.
async fn stage(
    settings: &KafkaSettings,
    topic: &str,
    history: u64,
    measure: u64,
) -> anyhow::Result<(serde_json::Value, u64)> {
    let (settings, topic) = (settings.clone(), topic.to_owned());
    let attached = Attached::start(
        &settings,
        &settings.group(&format!("attached-{history}")),
        &topic,
    )?;
    let joined = Instant::now();
    let assigned = attached.wait_assigned(PHASE_DEADLINE).await;
    let join_secs = joined.elapsed().as_secs_f64();
    let from = high_watermarks(&settings, &topic).await?;
    let gateway = producer(&settings, 1)?;
    let started = Instant::now();
    let (acked, failed) = produce(
        &gateway,
        &topic,
        measure,
        IN_FLIGHT,
        started + PHASE_DEADLINE,
    )
    .await;
    let produce_took = started.elapsed();
    while attached.read.load(Ordering::Relaxed) < acked && started.elapsed() < PHASE_DEADLINE {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let attached_read = attached.read.load(Ordering::Relaxed);
    let attached_took = started.elapsed();
    drop(attached);

    let reader = base_config(&settings)
        .set("group.id", settings.group("catch-up"))
        .set("enable.auto.commit", "false")
        .clone();
    let (caught_up, catch_up_took) = catch_up(reader, &topic, from, acked).await?;

    let mut first_acks = Vec::new();
    let mut first_acks_failed = 0;
    for _ in 0..5 {
        let (took, acked) = first_ack(&settings, &topic).await?;
        first_acks.push(took.as_secs_f64() * 1000.0);
        first_acks_failed += u64::from(!acked);
    }
    first_acks.sort_by(f64::total_cmp);
    let report = serde_json::json!({
        "history": history,
        "measured": measure,
        "group_join_seconds": join_secs,
        "group_assigned": assigned,
        "produced": acked,
        "produce_failed": failed,
        "produce_per_second": per_second(acked, produce_took),
        "attached_read": attached_read,
        "attached_per_second": per_second(attached_read, attached_took),
        "catch_up_read": caught_up,
        "catch_up_per_second": per_second(caught_up, catch_up_took),
        "producer_id_ms_median": first_acks[first_acks.len() / 2],
        "producer_id_ms_max": first_acks[first_acks.len() - 1],
        "producer_id_failed": first_acks_failed,
        "timed_out": acked < measure || attached_read < acked || caught_up < acked
            || first_acks_failed > 0,
    });
    Ok((report, acked + first_acks.len() as u64 - first_acks_failed))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let histories: Vec<u64> = arg("history", "0,100000,1000000")
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    let measure: u64 = arg("measure", "20000").parse()?;
    let mut settings = KafkaSettings::from_env(&Env::process())?;
    settings.prefix = format!("bench-{}.", uuid::Uuid::now_v7().simple());
    kafka::ensure_topics(&settings).await?;
    let topic = settings.topic(topic::PURCHASE_REQUESTS);
    let filler = producer(&settings, 20)?;
    let mut written = 0u64;
    for history in histories {
        if history > written {
            let started = Instant::now();
            let (filled, failed) = produce(
                &filler,
                &topic,
                history - written,
                100_000,
                Instant::now() + Duration::from_secs(3600),
            )
            .await;
            anyhow::ensure!(
                failed == 0,
                "{failed} records of the fill were not acknowledged"
            );
            written += filled;
            eprintln!(
                "filled to {written} records in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }

        match stage(&settings, &topic, history, measure).await {
            Ok((report, sent)) => {
                written += sent;
                println!("{report}");
            }
            Err(error) => {
                // A broker that stopped answering is the finding, not a
                // reason to print nothing.
                println!(
                    "{}",
                    serde_json::json!({"history": history, "error": format!("{error:#}")})
                );
                break;
            }
        }
    }
    Ok(())
}
