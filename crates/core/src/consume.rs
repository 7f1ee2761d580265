//! The consumer loop both workers run: at-least-once, in order, and
//! clean on shutdown.
//!
//! A handler first does, in arrival order, whatever must happen in order
//! (the shop-worker's reservation), and returns the rest of the work as a
//! task. Tasks run concurrently, but an offset is stored only when its task
//! and every earlier one have finished, so a committed offset never skips a
//! message whose effect is not yet durable. librdkafka auto-commits only
//! stored offsets, and commits them on partition revocation.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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
}

/// How long a member that stopped heartbeating (killed, partitioned) stays
/// in its group, holding its partitions, before the broker drops it.
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(10);

pub fn consumer(
    settings: &KafkaSettings,
    options: &ConsumerOptions,
) -> Result<StreamConsumer, KafkaFailure> {
    let consumer: StreamConsumer = base_config(settings)
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
    let mut pending: Pending = FuturesOrdered::new();
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
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Ok(()) = async { match pause.as_mut() {
                Some(p) => p.changed().await.map_err(|_| ()),
                None => std::future::pending().await,
            } } => {}
            Some((position, ok)) = pending.next(), if !pending.is_empty() => {
                if !acknowledge(&consumer, position, ok) {
                    stopped_by = Some("a message could not be processed".into());
                }
            }
            // Paused, it keeps polling (nothing comes) even with its
            // in-flight work full, so the group does not evict it.
            received = consumer.recv(), if pending.len() < options.max_in_flight || paused => {
                match received {
                    Ok(message) => {
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
    let drained = tokio::time::timeout(options.drain_timeout, async {
        while let Some((position, ok)) = pending.next().await {
            if !acknowledge(&consumer, position, ok) {
                break;
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("in-flight work did not finish in time; it will be redelivered");
    }
    if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync) {
        // Nothing stored since the last commit, or the group is gone: either
        // way the next member resumes from the last committed offset.
        tracing::debug!(%error, "final commit");
    }
    consumer.unsubscribe();
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

/// Stores the offset after `position` if its work succeeded; returns
/// whether the loop may go on.
fn acknowledge(consumer: &StreamConsumer, position: Position, ok: bool) -> bool {
    if !ok {
        return false;
    }
    if let Err(error) = consumer.store_offset(&position.topic, position.partition, position.offset)
    {
        // The partition was revoked while its message was in flight: the new
        // owner replays it, and every handler is idempotent.
        tracing::debug!(%error, topic = %position.topic, partition = position.partition, "offset not stored");
    }
    true
}
