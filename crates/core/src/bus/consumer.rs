//! The consumer loop both workers run: at-least-once, in order, and
//! clean on shutdown and on rebalances.
//!
//! A handler first does, in arrival order, whatever must happen in order
//! (the shop-worker's reservation), and returns the rest of the work as a
//! task. Tasks run concurrently; `partition_work` keeps, per partition,
//! which have ended, and an offset is committed only when its task and
//! every earlier one of its partition succeeded, so a committed offset
//! never skips a message whose effect is not yet durable. Once a task
//! failed, no later offset of its partition is committed (the loop stops,
//! and the next member starts again at the failed message).
//!
//! The member commits by itself, every `COMMIT_EVERY`, not librdkafka's
//! auto-commit: librdkafka commits the stored offsets of partitions it
//! takes away even when they were lost (the member was dropped from its
//! group), and tansu 0.6 accepts a commit of any generation, so a member
//! stopped past its session and woken up took its group's offsets back
//! behind what the partitions' new owner had committed (chaos seed 7,
//! round 22). A member commits nothing of an assignment that is lost, nor
//! right after it was not running for a while (`frozen`).
//!
//! On a rebalance, before partitions are taken away (`RebalanceContext`),
//! their in-flight work may finish (up to the drain timeout), how far they
//! got is committed synchronously, and they are forgotten: the next owner
//! starts where this member stopped, without running the same messages at
//! the same time, and a late finish never moves an offset of a partition
//! this member no longer owns. Lost partitions are forgotten at once.
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

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::bus::consumer_health::{Backlog, ConsumerHealth, Judge, Observation, Verdict};
use crate::bus::frozen::{FreezeWatch, Turn};
use crate::bus::kafka::{KafkaFailure, base_config};
use crate::bus::partition_work::{PartitionWork, Ticket, TopicPartition};
use crate::service::settings::KafkaSettings;

/// The consumer the workers run.
pub type WorkConsumer = StreamConsumer<RebalanceContext>;

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

#[derive(Debug)]
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
pub fn stall_after(
    env: &crate::service::settings::Env,
) -> Result<Duration, crate::service::settings::SettingError> {
    env.millis("CONSUMER_STALL_MS", 15_000)
}

/// How long a member that stopped heartbeating (killed, partitioned) stays
/// in its group, holding its partitions, before the broker drops it.
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(10);

pub fn consumer(options: &ConsumerOptions) -> Result<WorkConsumer, KafkaFailure> {
    consumer_speaking(options, &options.kafka.consumer_assignment)
}

/// The other kind of assignor than `assignment` (eager or cooperative).
fn other_protocol(assignment: &str) -> &'static str {
    if assignment.contains("cooperative") {
        "range,roundrobin"
    } else {
        "cooperative-sticky"
    }
}

fn consumer_speaking(
    options: &ConsumerOptions,
    assignment: &str,
) -> Result<WorkConsumer, KafkaFailure> {
    let context = RebalanceContext {
        work: Arc::new(PartitionWork::default()),
        drain_timeout: options.drain_timeout,
        health: options.health.clone(),
        revoked_at: std::sync::Mutex::new(None),
    };
    let consumer: WorkConsumer = base_config(&options.kafka)
        .set("group.id", &options.group)
        // The member commits by itself (see the top of this module).
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set(
            "session.timeout.ms",
            SESSION_TIMEOUT.as_millis().to_string(),
        )
        .set("heartbeat.interval.ms", "1000")
        .set("fetch.wait.max.ms", "50")
        .set("partition.assignment.strategy", assignment)
        .create_with_context(context)
        .map_err(KafkaFailure::Client)?;
    let topics: Vec<&str> = options.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(KafkaFailure::Client)?;
    Ok(consumer)
}

/// The work of one message, which records its own end in the partition
/// work (also while the loop is held in a rebalance) and tells the loop
/// whether it failed (for the partition's current assignment).
type Pending = FuturesUnordered<JoinHandle<bool>>;

/// How often the member commits how far its partitions are done.
const COMMIT_EVERY: Duration = Duration::from_millis(500);

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
    consumer: WorkConsumer,
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
    // A group keeps the kind of assignor it began with (tansu 0.6 refuses
    // the other kind for good): a member that is refused for it joins again
    // speaking the group's.
    let protocol_refused = rejoin_tx.clone();
    let mut assignment = options.kafka.consumer_assignment.clone();
    let lag = tokio::spawn(export_lag(
        watched.clone(),
        options.kafka.clone(),
        options.group.clone(),
        options.topics.clone(),
        options.health.clone(),
        shutdown.clone(),
    ));
    let committer = tokio::spawn(commit_regularly(watched.clone(), shutdown.clone()));
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
    let mut pending: Pending = FuturesUnordered::new();
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
                tracing::error!(%reason, group = %options.group, "joining the group again with a new consumer");
                if !drain(&mut pending, options.drain_timeout).await {
                    stopped_by = Some("a message could not be processed".into());
                    continue;
                }
                current.send_replace(None);
                let Some(fresh) = replace(consumer, options, &assignment, &shutdown).await else {
                    watchdog.abort();
                    lag.abort();
                    committer.abort();
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
            Some(ended) = pending.next(), if !pending.is_empty() => {
                if !acknowledge(ended) {
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
                        let partition = (message.topic().to_owned(), message.partition());
                        let offset = message.offset();
                        let work = consumer.context().work.clone();
                        let ticket = work.started(&partition, offset);
                        match handler.start(message).await {
                            Ok(completion) => {
                                pending.push(spawned(work, ticket, completion, options.health.clone()));
                            }
                            Err(reason) => {
                                work.finished(&ticket, false);
                                stopped_by = Some(reason.0);
                            }
                        }
                    }
                    // librdkafka reports broker hiccups here and recovers by itself.
                    Err(rdkafka::error::KafkaError::MessageConsumption(
                        rdkafka::types::RDKafkaErrorCode::InconsistentGroupProtocol,
                    )) => {
                        let speaks = other_protocol(&assignment);
                        if protocol_refused
                            .try_send(format!("the group speaks another assignor; joining with {speaks}"))
                            .is_ok()
                        {
                            assignment = speaks.to_owned();
                        }
                    }
                    Err(error) => tracing::warn!(%error, "kafka consumer error"),
                }
            }
        }
    }
    watchdog.abort();
    lag.abort();
    committer.abort();
    drain(&mut pending, options.drain_timeout).await;
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

/// Lets in-flight work finish (up to `timeout`); the commit when the
/// consumer closes says how far each partition got. `false` if some work
/// failed (or did not finish).
async fn drain(pending: &mut Pending, timeout: Duration) -> bool {
    let drained = tokio::time::timeout(timeout, async {
        let mut all_ok = true;
        while let Some(ended) = pending.next().await {
            all_ok &= acknowledge(ended);
        }
        all_ok
    })
    .await;
    // Whatever did not finish is abandoned: its offset was never stored.
    *pending = FuturesUnordered::new();
    drained.unwrap_or_else(|_| {
        tracing::warn!("in-flight work did not finish in time; it will be redelivered");
        false
    })
}

/// How long closing a consumer may take: librdkafka's close can hang when
/// the broker is gone (rust-rdkafka #611, #453), and a worker must still
/// stop or rejoin. A stopping worker takes at most its drain timeout plus
/// this (the Deployments' grace periods are checked against the sum).
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Commits how far the partitions got, leaves the group and drops the
/// consumer, on a blocking thread, giving up after `CLOSE_TIMEOUT`.
async fn close(consumer: Arc<WorkConsumer>) {
    let closing = tokio::task::spawn_blocking(move || {
        commit_done(&*consumer, None);
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
    old: Arc<WorkConsumer>,
    options: &ConsumerOptions,
    assignment: &str,
    shutdown: &CancellationToken,
) -> Option<Arc<WorkConsumer>> {
    close(old).await;
    let mut wait = Duration::from_millis(200);
    loop {
        match consumer_speaking(options, assignment) {
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

/// Regular looks at the member, until shutdown.
struct Looks {
    tick: tokio::time::Interval,
    consumer: tokio::sync::watch::Receiver<Option<Arc<WorkConsumer>>>,
    shutdown: CancellationToken,
}

impl Looks {
    fn every(
        period: Duration,
        consumer: tokio::sync::watch::Receiver<Option<Arc<WorkConsumer>>>,
        shutdown: CancellationToken,
    ) -> Self {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            tick,
            consumer,
            shutdown,
        }
    }

    /// The member at the next tick (skipping ticks while it is being
    /// replaced); `None` once shutdown is asked.
    async fn next(&mut self) -> Option<Arc<WorkConsumer>> {
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                _ = self.tick.tick() => {}
            }
            if let Some(member) = self.consumer.borrow_and_update().clone() {
                return Some(member);
            }
        }
    }
}

/// Looks at the member every second, publishes its health, and asks the
/// loop for a new consumer when the judge says so.
#[allow(clippy::too_many_arguments)]
async fn watch(
    consumer: tokio::sync::watch::Receiver<Option<Arc<WorkConsumer>>>,
    progress: Arc<Progress>,
    began: Instant,
    topics: Vec<String>,
    stall_after: Duration,
    health: ConsumerHealth,
    rejoin: tokio::sync::mpsc::Sender<String>,
    shutdown: CancellationToken,
) {
    let mut judge = Judge::new(stall_after);
    let mut looks = Looks::every(Duration::from_secs(1), consumer, shutdown);
    let mut asking: Option<JoinHandle<Result<Backlog, String>>> = None;
    while let Some(member) = looks.next().await {
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

/// How often the lag of the owned partitions is read for `/metrics`.
const LAG_EVERY: Duration = Duration::from_secs(5);

/// Publishes, every `LAG_EVERY`, the lag of the partitions the member owns
/// (`flashsale lag`'s reading, without asking the broker to describe the
/// group), for autoscalers and dashboards.
async fn export_lag(
    consumer: tokio::sync::watch::Receiver<Option<Arc<WorkConsumer>>>,
    kafka: KafkaSettings,
    group: String,
    topics: Vec<String>,
    health: ConsumerHealth,
    shutdown: CancellationToken,
) {
    let mut looks = Looks::every(LAG_EVERY, consumer, shutdown);
    while let Some(member) = looks.next().await {
        let owned: std::collections::HashSet<TopicPartition> = member
            .assignment()
            .map(|a| partitions_in(&a).collect())
            .unwrap_or_default();
        drop(member);
        match crate::bus::lag::group_lag(&kafka, &group, &topics, false).await {
            Ok(lag) => health.record_lag(&group, &lag.partitions, &owned),
            Err(error) => tracing::debug!(%error, "reading the group's lag failed"),
        }
    }
}

/// What is left to read in `topics` for the member's group and for the
/// member itself. Blocking: librdkafka's queries wait on the broker.
fn backlog(consumer: &WorkConsumer, topics: &[String]) -> Result<Backlog, String> {
    let mut all = TopicPartitionList::new();
    let mut ends = std::collections::HashMap::new();
    for topic in topics {
        let ranges = crate::bus::topic_reader::ranges_of(consumer, topic, ASK_TIMEOUT)
            .map_err(|e| format!("end offsets of {topic}: {e}"))?;
        for range in ranges {
            all.add_partition(topic, range.partition);
            ends.insert((topic.clone(), range.partition), (range.low, range.high));
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

fn set_paused(consumer: &WorkConsumer, paused: bool) {
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

/// Runs a message's remaining work as a task of its own, which records
/// its end in the partition work whatever happens (a panic included).
fn spawned(
    work: Arc<PartitionWork>,
    ticket: Ticket,
    completion: Completion,
    health: ConsumerHealth,
) -> JoinHandle<bool> {
    let offset = ticket.offset;
    health.count_in_flight(1);
    tokio::spawn(async move {
        let ok = match std::panic::AssertUnwindSafe(completion)
            .catch_unwind()
            .await
        {
            Ok(Ok(())) => true,
            Ok(Err(reason)) => {
                tracing::warn!(%reason, offset, "message left uncommitted");
                false
            }
            Err(_) => {
                tracing::error!(offset, "message handler crashed");
                false
            }
        };
        let current = work.finished(&ticket, ok);
        if !current {
            tracing::debug!(offset, ok, "work of a partition since taken away ended");
        }
        health.count_handled(ok);
        health.count_in_flight(-1);
        ok || !current
    })
}

/// Whether the work of a message ended well (or no longer matters: its
/// partition was taken away meanwhile).
fn acknowledge(ended: Result<bool, tokio::task::JoinError>) -> bool {
    // A task that was itself lost (runtime shutting down) did not record
    // its end, so nothing past it is committed.
    ended.unwrap_or(false)
}

/// Commits, synchronously, how far the partitions (of `only`, or all) are
/// done past what this member committed; returns how many it committed.
/// Nothing while the member's assignment is lost: another member may own
/// those partitions now and have gone further.
fn commit_done<C: Consumer<RebalanceContext>>(
    consumer: &C,
    only: Option<&[TopicPartition]>,
) -> usize {
    if consumer.assignment_lost() {
        return 0;
    }
    consumer.context().work.commit_done(only, |due| {
        let mut list = TopicPartitionList::new();
        for ((topic, partition), next) in due {
            if let Err(error) = list.add_partition_offset(topic, *partition, Offset::Offset(*next))
            {
                tracing::warn!(%error, "cannot name an offset to commit");
                return false;
            }
        }
        match consumer.commit(&list, CommitMode::Sync) {
            Ok(()) => true,
            Err(error) => {
                // Made again at the next turn: the work stays done.
                tracing::warn!(%error, partitions = due.len(), "commit failed");
                false
            }
        }
    })
}

/// Every `COMMIT_EVERY`, commits how far the member's partitions are done,
/// unless its assignment is lost or it was just not running for a while
/// (`frozen`), until shutdown (the consumer's close commits last).
async fn commit_regularly(
    consumer: tokio::sync::watch::Receiver<Option<Arc<WorkConsumer>>>,
    shutdown: CancellationToken,
) {
    let mut freeze = FreezeWatch::new(FROZEN_AFTER, FROZEN_HOLD);
    let mut looks = Looks::every(COMMIT_EVERY, consumer, shutdown);
    while let Some(member) = looks.next().await {
        match freeze.turn(Instant::now()) {
            Turn::Go => {}
            Turn::Woke { gap } => {
                tracing::warn!(
                    gap_ms = gap.as_millis() as u64,
                    "this member was not running for a while; holding its commits until its group session is known"
                );
                continue;
            }
            Turn::Holding => continue,
        }
        let committing = tokio::task::spawn_blocking(move || commit_done(&*member, None));
        if let Err(error) = committing.await {
            tracing::warn!(%error, "the commit task was lost");
        }
    }
}

/// A gap between the committer's turns longer than this is a freeze: a
/// third of the group session, so that a member frozen past its session
/// is always caught.
const FROZEN_AFTER: Duration = Duration::from_millis(SESSION_TIMEOUT.as_millis() as u64 / 3);

/// How long commits are held after a freeze: librdkafka judges the session
/// at once on waking, and a live one answers the next heartbeat (every
/// second).
const FROZEN_HOLD: Duration = Duration::from_secs(3);

/// What the workers' consumers do on a rebalance, inside librdkafka's
/// callback (which runs in the loop's poll of the consumer).
#[derive(Debug)]
pub struct RebalanceContext {
    work: Arc<PartitionWork>,
    drain_timeout: Duration,
    health: ConsumerHealth,
    /// When partitions were last taken away, for the time rebalances keep
    /// them from being worked on.
    revoked_at: std::sync::Mutex<Option<Instant>>,
}

impl ClientContext for RebalanceContext {}

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else {
            return;
        };
        let partitions: Vec<TopicPartition> = partitions_in(revoked).collect();
        if let Ok(mut at) = self.revoked_at.lock() {
            *at = Some(Instant::now());
        }
        if consumer.assignment_lost() {
            // The group went on without this member: another may own these
            // partitions and have gone further, so nothing of them is
            // committed, and what is still running of them counts for
            // nothing (whoever owns them runs it again).
            block_in_place(|| self.work.forget(&partitions));
            tracing::warn!(
                lost = partitions.len(),
                "partitions lost (this member was dropped from its group); nothing of them committed"
            );
            return;
        }
        // The callback holds the loop's task; the work it waits for runs
        // in tasks of its own, which this thread must not keep from running.
        let committed = block_in_place(|| {
            if !self.work.wait_idle(&partitions, self.drain_timeout) {
                tracing::warn!(
                    partitions = partitions.len(),
                    "work of revoked partitions did not finish in time; the next owner runs it again"
                );
            }
            let committed = commit_done(consumer, Some(&partitions));
            self.work.forget(&partitions);
            committed
        });
        tracing::info!(revoked = partitions.len(), committed, "partitions revoked");
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(assigned) => {
                let paused = self
                    .revoked_at
                    .lock()
                    .ok()
                    .and_then(|mut at| at.take())
                    .map(|at| at.elapsed());
                self.health.count_rebalance(paused);
                tracing::info!(
                    assigned = assigned.count(),
                    paused_ms = paused.map(|p| p.as_millis() as u64),
                    "partitions assigned"
                );
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance failed"),
        }
    }
}

/// The topics and partitions a list names.
fn partitions_in(list: &TopicPartitionList) -> impl Iterator<Item = TopicPartition> + '_ {
    list.elements()
        .into_iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
}

/// Runs blocking `f` without starving the runtime's other tasks where the
/// runtime allows it (a multi-threaded one).
fn block_in_place<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}
