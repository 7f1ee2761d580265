//! The consumer loop both workers run: at-least-once, in order, and
//! clean on shutdown.
//!
//! A handler first does, in arrival order, whatever must happen in order
//! (the shop-worker's reservation), and returns the rest of the work as a
//! task. Tasks run concurrently, but an offset is stored only when its task
//! and every earlier one have finished, so a committed offset never skips a
//! message whose effect is not yet durable; once a task of a partition
//! failed, no later offset of that partition is stored (the loop stops, and
//! the next member starts again at the failed message). librdkafka auto-commits only
//! stored offsets, and commits them on partition revocation.
//!
//! A watchdog looks at the member every second (`consumer_health` judges
//! what it sees): a member out of its group, or holding partitions that
//! deliver nothing, while records wait, is reported not ready at once and,
//! after `stall_after`, gives up its consumer and joins with a new one.
//! librdkafka rejoins by itself after most mishaps; this is for the ones
//! it does not recover from (a broker that lost the group's state, a
//! member left without partitions), which otherwise idle forever.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::consumer_health::{Backlog, ConsumerHealth, Judge, Observation, Verdict};
use crate::kafka::{KafkaFailure, base_config};
use crate::settings::KafkaSettings;

/// The work left for one message after its in-order part; `Ok` once its
/// effect is durable, `Err(Abandoned)` if it was given up (shutdown), in
/// which case its offset, and every later one, stays uncommitted.
pub type Completion = Pin<Box<dyn Future<Output = Result<(), Abandoned>> + Send>>;

#[derive(Debug, thiserror::Error)]
#[error("processing was abandoned: {0}")]
pub struct Abandoned(pub String);

pub trait Handler: Send + Sync + 'static {
    /// Does the in-order part of processing `message`. Returning `Err`
    /// stops the consumer without committing this message.
    fn start(
        &self,
        message: OwnedMessage,
    ) -> impl Future<Output = Result<Completion, Abandoned>> + Send;
}

/// A completion with nothing left to do.
pub fn done() -> Completion {
    Box::pin(async { Ok(()) })
}

pub struct ConsumerOptions {
    pub kafka: KafkaSettings,
    pub group: String,
    pub topics: Vec<String>,
    /// Messages whose completion may be outstanding at once.
    pub max_in_flight: usize,
    /// How long in-flight work may take to finish after shutdown is asked.
    pub drain_timeout: Duration,
    /// While this says `true`, the assigned partitions are paused: nothing
    /// new is delivered, but the consumer keeps polling and stays in its
    /// group (a long pause must not look like a dead member).
    pub pause: Option<tokio::sync::watch::Receiver<bool>>,
    /// How long a member may hold partitions that deliver nothing, or sit
    /// out of its group, while records wait, before it rejoins with a new
    /// consumer (`FLASHSALE_CONSUMER_STALL_MS`).
    pub stall_after: Duration,
    /// Where the member's health goes (`/readyz`, `/metrics`).
    pub health: ConsumerHealth,
}

/// `FLASHSALE_CONSUMER_STALL_MS`, the workers' `stall_after`.
pub fn stall_after(env: &crate::settings::Env) -> Result<Duration, crate::settings::SettingError> {
    env.millis("CONSUMER_STALL_MS", 15_000)
}

/// How long a member that stopped heartbeating (killed, partitioned) stays
/// in its group, holding its partitions, before the broker drops it.
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(10);

pub fn consumer(options: &ConsumerOptions) -> Result<StreamConsumer, KafkaFailure> {
    let consumer: StreamConsumer = base_config(&options.kafka)
        .set("group.id", &options.group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "500")
        // We store an offset only once the effect of its message is durable.
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set(
            "session.timeout.ms",
            SESSION_TIMEOUT.as_millis().to_string(),
        )
        .set("heartbeat.interval.ms", "1000")
        .set("fetch.wait.max.ms", "50")
        .create()
        .map_err(KafkaFailure::Client)?;
    let topics: Vec<&str> = options.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(KafkaFailure::Client)?;
    Ok(consumer)
}

struct Position {
    topic: String,
    partition: i32,
    offset: i64,
}

type Pending = FuturesOrdered<Pin<Box<dyn Future<Output = (Position, bool)> + Send>>>;

/// What the loop tells its watchdog.
#[derive(Default)]
struct Progress {
    /// When a record was last delivered, in ms since the loop began.
    delivered_ms: AtomicU64,
    paused: AtomicBool,
    saturated: AtomicBool,
}

/// Runs `handler` over the subscription until `shutdown`, then finishes
/// in-flight work (up to the drain timeout), commits, and leaves the group.
///
/// Returns `Err` when it stopped on its own, because a message could not be
/// processed: the caller should exit so that a supervisor restarts it and
/// the message, left uncommitted, is delivered again, rather than idle on
/// while looking healthy.
pub async fn run<H: Handler>(
    consumer: StreamConsumer,
    handler: H,
    options: &ConsumerOptions,
    shutdown: CancellationToken,
) -> Result<(), Abandoned> {
    let began = Instant::now();
    let progress = Arc::new(Progress::default());
    let mut consumer = Arc::new(consumer);
    // The watchdog's view of the consumer; `None` while it is replaced, so
    // that the old one is closed holding the last reference to it.
    let (current, watched) = tokio::sync::watch::channel(Some(consumer.clone()));
    let (rejoin_tx, mut rejoin_rx) = tokio::sync::mpsc::channel::<String>(1);
    let watchdog = tokio::spawn(watch(
        watched,
        progress.clone(),
        began,
        options.topics.clone(),
        options.stall_after,
        options.health.clone(),
        rejoin_tx,
        shutdown.clone(),
    ));
    let mut pending: Pending = FuturesOrdered::new();
    // Partitions with a message whose work failed: no offset of theirs is
    // stored any more, so the failed message is delivered again.
    let mut failed = Failed::default();
    let mut stopped_by: Option<String> = None;
    let mut pause = options.pause.clone();
    let mut paused = false;
    while stopped_by.is_none() {
        let wanted = pause.as_ref().is_some_and(|p| *p.borrow());
        // Checked every turn: a rebalance hands over partitions unpaused.
        if wanted || paused {
            set_paused(&consumer, wanted);
            paused = wanted;
        }
        progress.paused.store(paused, Ordering::Relaxed);
        progress
            .saturated
            .store(pending.len() >= options.max_in_flight, Ordering::Relaxed);
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(reason) = rejoin_rx.recv() => {
                tracing::error!(%reason, group = %options.group, "consumer stalled; joining the group again with a new consumer");
                if !drain(&consumer, &mut pending, options.drain_timeout, &mut failed).await {
                    stopped_by = Some("a message could not be processed".into());
                    continue;
                }
                current.send_replace(None);
                let Some(fresh) = replace(consumer, options, &shutdown).await else {
                    watchdog.abort();
                    tracing::info!(group = %options.group, "consumer left its group");
                    return Ok(());
                };
                consumer = fresh;
                current.send_replace(Some(consumer.clone()));
                options.health.count_rejoin();
                progress.delivered_ms.store(millis_since(began), Ordering::Relaxed);
            }
            Ok(()) = async { match pause.as_mut() {
                Some(p) => p.changed().await.map_err(|_| ()),
                None => std::future::pending().await,
            } } => {}
            Some((position, ok)) = pending.next(), if !pending.is_empty() => {
                if !acknowledge(&consumer, position, ok, &mut failed) {
                    stopped_by = Some("a message could not be processed".into());
                }
            }
            // Paused, it keeps polling (nothing comes) even with its
            // in-flight work full, so the group does not evict it.
            received = consumer.recv(), if pending.len() < options.max_in_flight || paused => {
                match received {
                    Ok(message) => {
                        progress.delivered_ms.store(millis_since(began), Ordering::Relaxed);
                        let message = message.detach();
                        let position = Position {
                            topic: message.topic().to_owned(),
                            partition: message.partition(),
                            offset: message.offset(),
                        };
                        match handler.start(message).await {
                            Ok(completion) => pending.push_back(spawned(position, completion)),
                            Err(reason) => stopped_by = Some(reason.0),
                        }
                    }
                    // librdkafka reports broker hiccups here and recovers by itself.
                    Err(error) => tracing::warn!(%error, "kafka consumer error"),
                }
            }
        }
    }
    watchdog.abort();
    drain(&consumer, &mut pending, options.drain_timeout, &mut failed).await;
    close(consumer).await;
    tracing::info!(group = %options.group, "consumer left its group");
    match stopped_by {
        // Asked to stop: whatever was abandoned on the way was abandoned
        // because of the shutdown.
        _ if shutdown.is_cancelled() => Ok(()),
        Some(reason) => {
            tracing::error!(%reason, "consumer stopped");
            Err(Abandoned(reason))
        }
        None => Ok(()),
    }
}

fn millis_since(began: Instant) -> u64 {
    began.elapsed().as_millis() as u64
}

/// Lets in-flight work finish (up to `timeout`), storing the offsets of
/// what succeeded on partitions where nothing failed. `false` if some work
/// failed (or did not finish).
async fn drain(
    consumer: &StreamConsumer,
    pending: &mut Pending,
    timeout: Duration,
    failed: &mut Failed,
) -> bool {
    let drained = tokio::time::timeout(timeout, async {
        let mut all_ok = true;
        while let Some((position, ok)) = pending.next().await {
            all_ok &= acknowledge(consumer, position, ok, failed);
        }
        all_ok
    })
    .await;
    // Whatever did not finish is abandoned: its offset was never stored.
    *pending = FuturesOrdered::new();
    drained.unwrap_or_else(|_| {
        tracing::warn!("in-flight work did not finish in time; it will be redelivered");
        false
    })
}

/// The partitions where a message's work failed.
type Failed = std::collections::HashSet<(String, i32)>;

/// How long closing a consumer may take: librdkafka's close can hang when
/// the broker is gone (rust-rdkafka #611, #453), and a worker must still
/// stop or rejoin.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Commits what was stored, leaves the group and drops the consumer, on a
/// blocking thread, giving up after `CLOSE_TIMEOUT`.
async fn close(consumer: Arc<StreamConsumer>) {
    let closing = tokio::task::spawn_blocking(move || {
        if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync) {
            // Nothing stored since the last commit, or the group is gone:
            // either way the next member resumes from the last committed offset.
            tracing::debug!(%error, "final commit");
        }
        consumer.unsubscribe();
        drop(consumer);
    });
    if tokio::time::timeout(CLOSE_TIMEOUT, closing).await.is_err() {
        tracing::warn!("the consumer did not close in time; left behind");
    }
}

/// Closes `old` and joins the group with a new consumer, retrying until
/// one is made; `None` if shutdown came first.
async fn replace(
    old: Arc<StreamConsumer>,
    options: &ConsumerOptions,
    shutdown: &CancellationToken,
) -> Option<Arc<StreamConsumer>> {
    close(old).await;
    let mut wait = Duration::from_millis(200);
    loop {
        match consumer(options) {
            Ok(fresh) => return Some(Arc::new(fresh)),
            Err(error) => tracing::error!(%error, "could not make a new consumer; trying again"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

/// Looks at the member every second, publishes its health, and asks the
/// loop for a new consumer when the judge says so.
#[allow(clippy::too_many_arguments)]
async fn watch(
    mut consumer: tokio::sync::watch::Receiver<Option<Arc<StreamConsumer>>>,
    progress: Arc<Progress>,
    began: Instant,
    topics: Vec<String>,
    stall_after: Duration,
    health: ConsumerHealth,
    rejoin: tokio::sync::mpsc::Sender<String>,
    shutdown: CancellationToken,
) {
    let mut judge = Judge::new(stall_after);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut asking: Option<JoinHandle<Result<Backlog, String>>> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(member) = consumer.borrow_and_update().clone() else {
            continue;
        };
        let delivered = Duration::from_millis(progress.delivered_ms.load(Ordering::Relaxed));
        let mut observation = Observation {
            paused: progress.paused.load(Ordering::Relaxed),
            saturated: progress.saturated.load(Ordering::Relaxed),
            assigned: member.assignment().map(|a| a.count()).unwrap_or(0),
            since_delivery: began.elapsed().saturating_sub(delivered),
            backlog: Backlog::NotAsked,
        };
        if judge.needs_backlog(&observation) {
            // One question at a time: while the broker does not answer, the
            // next look waits on the same one.
            let question = asking.get_or_insert_with(|| {
                let (member, topics) = (member.clone(), topics.clone());
                tokio::task::spawn_blocking(move || backlog(&member, &topics))
            });
            observation.backlog = match tokio::time::timeout(ASK_TIMEOUT, question).await {
                Ok(answer) => {
                    asking = None;
                    match answer {
                        Ok(Ok(backlog)) => backlog,
                        Ok(Err(why)) => Backlog::Unknown(why),
                        Err(join) => Backlog::Unknown(join.to_string()),
                    }
                }
                Err(_) => Backlog::Unknown(format!(
                    "the broker did not answer within {} s",
                    ASK_TIMEOUT.as_secs()
                )),
            };
        }
        let verdict = judge.judge(Instant::now(), &observation);
        health.record(&observation, &verdict);
        if let Verdict::Unhealthy {
            reason,
            rejoin: true,
        } = verdict
            && rejoin.try_send(reason).is_ok()
        {
            judge.rejoined(Instant::now());
        }
    }
}

const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// What is left to read in `topics` for the member's group and for the
/// member itself. Blocking: librdkafka's queries wait on the broker.
fn backlog(consumer: &StreamConsumer, topics: &[String]) -> Result<Backlog, String> {
    let mut all = TopicPartitionList::new();
    let mut ends = std::collections::HashMap::new();
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), ASK_TIMEOUT)
            .map_err(|e| format!("metadata of {topic}: {e}"))?;
        for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
            let (low, high) = consumer
                .fetch_watermarks(topic, partition.id(), ASK_TIMEOUT)
                .map_err(|e| format!("end offsets of {topic}: {e}"))?;
            all.add_partition(topic, partition.id());
            ends.insert((topic.clone(), partition.id()), (low, high));
        }
    }
    let committed = consumer
        .committed_offsets(all, ASK_TIMEOUT)
        .map_err(|e| format!("the group's committed offsets: {e}"))?;
    let mut group_unread = 0;
    let mut committed_sum = 0;
    let mut read_up_to = std::collections::HashMap::new();
    for element in committed.elements() {
        let key = (element.topic().to_owned(), element.partition());
        let Some(&(low, high)) = ends.get(&key) else {
            continue;
        };
        let from = match element.offset() {
            Offset::Offset(n) => {
                committed_sum += n;
                n.max(low)
            }
            // Nothing committed: the group starts at the beginning.
            _ => low,
        };
        group_unread += (high - from).max(0);
        read_up_to.insert(key, from);
    }
    let mut mine_unread = 0;
    if let Ok(position) = consumer.position() {
        for element in position.elements() {
            let key = (element.topic().to_owned(), element.partition());
            let Some(&(_, high)) = ends.get(&key) else {
                continue;
            };
            let from = match element.offset() {
                Offset::Offset(n) => n,
                _ => read_up_to.get(&key).copied().unwrap_or(high),
            };
            mine_unread += (high - from).max(0);
        }
    }
    Ok(Backlog::Known {
        group_unread,
        mine_unread,
        committed_sum,
    })
}

fn set_paused(consumer: &StreamConsumer, paused: bool) {
    let assigned = match consumer.assignment() {
        Ok(assigned) => assigned,
        Err(error) => {
            tracing::debug!(%error, "no assignment to pause or resume");
            return;
        }
    };
    let changed = if paused {
        consumer.pause(&assigned)
    } else {
        consumer.resume(&assigned)
    };
    if let Err(error) = changed {
        tracing::warn!(%error, paused, "could not pause or resume the partitions");
    }
}

fn spawned(
    position: Position,
    completion: Completion,
) -> Pin<Box<dyn Future<Output = (Position, bool)> + Send>> {
    let task: JoinHandle<Result<(), Abandoned>> = tokio::spawn(completion);
    Box::pin(async move {
        let ok = match task.await {
            Ok(Ok(())) => true,
            Ok(Err(reason)) => {
                tracing::warn!(%reason, offset = position.offset, "message left uncommitted");
                false
            }
            Err(join) => {
                tracing::error!(error = %join, offset = position.offset, "message handler crashed");
                false
            }
        };
        (position, ok)
    })
}

/// Stores the offset of a finished message, unless its partition had a
/// failure: then a later message's offset would commit past the failed one,
/// which would never be delivered again. `false` for a failure.
fn acknowledge(
    consumer: &StreamConsumer,
    position: Position,
    ok: bool,
    failed: &mut Failed,
) -> bool {
    let partition = (position.topic.clone(), position.partition);
    if !ok {
        failed.insert(partition);
        return false;
    }
    if failed.contains(&partition) {
        return true;
    }
    if let Err(error) = consumer.store_offset(&position.topic, position.partition, position.offset)
    {
        // The partition was revoked while its message was in flight: the new
        // owner replays it, and every handler is idempotent.
        tracing::debug!(%error, topic = %position.topic, partition = position.partition, "offset not stored");
    }
    true
}
