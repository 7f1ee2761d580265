//! Reading a topic as data rather than as a consumer group member: its
//! watermarks, a group's committed offsets, and every record in a range.
//! For recovery, audits and tests; never on the hot path.
//!
//! librdkafka's calls here block, so each runs on the blocking pool.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};

use crate::bus::kafka::{KafkaFailure, base_config};
use crate::service::settings::KafkaSettings;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Where one partition's records are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionRange {
    pub partition: i32,
    pub low: i64,
    pub high: i64,
}

pub(crate) fn reader(settings: &KafkaSettings, group: &str) -> Result<BaseConsumer, KafkaFailure> {
    base_config(settings)
        .set("group.id", group)
        // A reader only looks: it must never move a group's offsets.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()
        .map_err(KafkaFailure::Client)
}

pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, KafkaFailure> + Send + 'static,
) -> Result<T, KafkaFailure> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(error) => {
            tracing::error!(%error, "a Kafka reader task died");
            Err(KafkaFailure::Client(rdkafka::error::KafkaError::Canceled))
        }
    }
}

/// The partitions of `topic` as the broker has them (partitions may have
/// been added since this deployment's settings were written). Blocking.
fn partitions_of<X: ConsumerContext, C: Consumer<X>>(
    consumer: &C,
    topic: &str,
    timeout: Duration,
) -> KafkaResult<Vec<i32>> {
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect())
}

/// Low and high watermarks of every partition of `topic`, as the broker
/// has them. Blocking: for the readers here, `flashsale lag` and the
/// workers' watchdog.
pub(crate) fn ranges_of<X: ConsumerContext, C: Consumer<X>>(
    consumer: &C,
    topic: &str,
    timeout: Duration,
) -> KafkaResult<Vec<PartitionRange>> {
    partitions_of(consumer, topic, timeout)?
        .into_iter()
        .map(|partition| {
            let (low, high) = consumer.fetch_watermarks(topic, partition, timeout)?;
            Ok(PartitionRange {
                partition,
                low,
                high,
            })
        })
        .collect()
}

/// Low and high watermarks of every partition of `topic`.
pub async fn watermarks(
    settings: &KafkaSettings,
    topic: &str,
) -> Result<Vec<PartitionRange>, KafkaFailure> {
    let settings = settings.clone();
    let topic = topic.to_owned();
    blocking(move || {
        let consumer = reader(&settings, "flashsale-watermarks")?;
        ranges_of(&consumer, &topic, TIMEOUT).map_err(KafkaFailure::Unreachable)
    })
    .await
}

/// The offsets `group` has committed on each partition of `topic`
/// (`None` where it has committed nothing).
pub async fn committed(
    settings: &KafkaSettings,
    group: &str,
    topic: &str,
) -> Result<Vec<(i32, Option<i64>)>, KafkaFailure> {
    GroupProgress::new(settings, group, topic)?
        .committed()
        .await
}

/// A long-lived handle on one group's committed offsets of one topic, for
/// asking often without a new client each time.
#[derive(Clone)]
pub struct GroupProgress {
    consumer: std::sync::Arc<BaseConsumer>,
    topic: String,
}

impl std::fmt::Debug for GroupProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupProgress")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl GroupProgress {
    pub fn new(settings: &KafkaSettings, group: &str, topic: &str) -> Result<Self, KafkaFailure> {
        Ok(Self {
            consumer: std::sync::Arc::new(reader(settings, group)?),
            topic: topic.to_owned(),
        })
    }

    pub async fn committed(&self) -> Result<Vec<(i32, Option<i64>)>, KafkaFailure> {
        let this = self.clone();
        blocking(move || {
            let mut wanted = TopicPartitionList::new();
            let partitions = partitions_of(this.consumer.as_ref(), &this.topic, TIMEOUT)
                .map_err(KafkaFailure::Unreachable)?;
            for partition in partitions {
                wanted.add_partition(&this.topic, partition);
            }
            let committed = this
                .consumer
                .committed_offsets(wanted, TIMEOUT)
                .map_err(KafkaFailure::Unreachable)?;
            Ok(committed
                .elements()
                .iter()
                .map(|e| match e.offset() {
                    Offset::Offset(n) => (e.partition(), Some(n)),
                    _ => (e.partition(), None),
                })
                .collect())
        })
        .await
    }
}

/// Every record of `topic` in `[low, high)` of each given partition.
pub async fn read(
    settings: &KafkaSettings,
    topic: &str,
    ranges: Vec<PartitionRange>,
    deadline: Duration,
) -> Result<Vec<OwnedMessage>, KafkaFailure> {
    let settings = settings.clone();
    let topic = topic.to_owned();
    blocking(move || {
        let ranges: Vec<PartitionRange> = ranges.into_iter().filter(|r| r.high > r.low).collect();
        if ranges.is_empty() {
            return Ok(Vec::new());
        }
        let consumer = reader(&settings, "flashsale-reader")?;
        let mut assignment = TopicPartitionList::new();
        for r in &ranges {
            assignment
                .add_partition_offset(&topic, r.partition, Offset::Offset(r.low))
                .map_err(KafkaFailure::Client)?;
        }
        consumer.assign(&assignment).map_err(KafkaFailure::Client)?;
        let mut remaining: std::collections::HashMap<i32, i64> =
            ranges.iter().map(|r| (r.partition, r.high)).collect();
        let mut records = Vec::new();
        let until = Instant::now() + deadline;
        while !remaining.is_empty() {
            if Instant::now() > until {
                return Err(KafkaFailure::Unreachable(
                    rdkafka::error::KafkaError::MessageConsumption(
                        rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
                    ),
                ));
            }
            let Some(polled) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let message = polled.map_err(KafkaFailure::Unreachable)?;
            let partition = message.partition();
            let Some(&high) = remaining.get(&partition) else {
                continue;
            };
            if message.offset() < high {
                records.push(message.detach());
            }
            if message.offset() + 1 >= high {
                remaining.remove(&partition);
            }
        }
        Ok(records)
    })
    .await
}
