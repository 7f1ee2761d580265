//! How far a consumer group is behind, per partition: the end offset, the
//! group's committed offset, the lag in messages, the age of the oldest
//! message not yet consumed, and which member owns the partition; and the
//! group's state and members. What `flashsale lag` shows.
//!
//! Only Kafka API calls every broker answers (metadata, watermarks,
//! OffsetFetch, DescribeGroups, Fetch), made by a client that never joins
//! the group and never commits.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::bus::kafka::KafkaFailure;
use crate::bus::topic_reader::{blocking, ranges_of, reader};
use crate::clock;
use crate::service::settings::KafkaSettings;

const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    /// The offset the next record will get (the high watermark).
    pub end_offset: i64,
    /// The group's committed offset; `None` when it never committed (it
    /// then starts at the earliest record).
    pub committed: Option<i64>,
    /// Records not consumed yet.
    pub lag: i64,
    /// Age of the oldest record not consumed yet, from its timestamp;
    /// `None` when nothing is behind (or its timestamp could not be read).
    pub lag_seconds: Option<f64>,
    /// The member that owns the partition, if any.
    pub owner: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Member {
    pub id: String,
    pub client_id: String,
    pub host: String,
    /// "topic/partition" of each partition it owns.
    pub partitions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupLag {
    pub group: String,
    /// As the broker says: Stable, PreparingRebalance, Empty, Dead...;
    /// "not asked", or "unknown (why)" when the broker would not describe
    /// the group (then `members` is empty and no partition has an `owner`).
    pub state: String,
    pub members: Vec<Member>,
    pub partitions: Vec<PartitionLag>,
    pub total_lag: i64,
    pub max_lag_seconds: Option<f64>,
}

/// The lag of `group` on `topics`; with `describe_group`, also its state,
/// its members and every topic they own.
pub async fn group_lag(
    settings: &KafkaSettings,
    group: &str,
    topics: &[String],
    describe_group: bool,
) -> Result<GroupLag, KafkaFailure> {
    let (settings, group, topics) = (settings.clone(), group.to_owned(), topics.to_vec());
    blocking(move || read(&settings, &group, &topics, describe_group)).await
}

fn read(
    settings: &KafkaSettings,
    group: &str,
    topics: &[String],
    describe_group: bool,
) -> Result<GroupLag, KafkaFailure> {
    let consumer = reader(settings, group)?;
    // Describing a group is asked for, not done by default: tansu 0.6 fails
    // DescribeGroups (it cannot read the group state it stored), and its
    // group then stops handing out partitions to its members. A broker that
    // cannot describe a group still gets its offsets shown.
    let (state, members) = if describe_group {
        describe(&consumer, group)
            .unwrap_or_else(|error| (format!("unknown ({error})"), Vec::new()))
    } else {
        ("not asked".to_owned(), Vec::new())
    };
    let mut topics = topics.to_vec();
    for partition in members.iter().flat_map(|m| &m.partitions) {
        if let Some((topic, _)) = partition.rsplit_once('/')
            && !topics.iter().any(|t| t == topic)
        {
            topics.push(topic.to_owned());
        }
    }
    let owners: HashMap<&str, &str> = members
        .iter()
        .flat_map(|m| m.partitions.iter().map(|p| (p.as_str(), m.id.as_str())))
        .collect();
    let mut wanted = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for topic in &topics {
        for range in ranges_of(&consumer, topic, TIMEOUT).map_err(KafkaFailure::Client)? {
            wanted.add_partition(topic, range.partition);
            ends.insert((topic.clone(), range.partition), (range.low, range.high));
        }
    }
    let committed = consumer
        .committed_offsets(wanted, TIMEOUT)
        .map_err(KafkaFailure::Client)?;
    let mut partitions = Vec::new();
    // One client reads the oldest waiting record of every lagging partition.
    let mut peek = None;
    for element in committed.elements() {
        let (topic, partition) = (element.topic().to_owned(), element.partition());
        let Some(&(low, high)) = ends.get(&(topic.clone(), partition)) else {
            continue;
        };
        let committed = match element.offset() {
            Offset::Offset(n) => Some(n),
            _ => None,
        };
        let from = committed.unwrap_or(low).max(low);
        let lag = (high - from).max(0);
        let lag_seconds = if lag > 0 {
            if peek.is_none() {
                peek = reader(settings, "flashsale-lag-peek").ok();
            }
            peek.as_ref()
                .and_then(|peek| oldest_age(peek, &topic, partition, from))
        } else {
            None
        };
        let owner = owners
            .get(format!("{topic}/{partition}").as_str())
            .map(|id| id.to_string());
        partitions.push(PartitionLag {
            topic,
            partition,
            end_offset: high,
            committed,
            lag,
            lag_seconds,
            owner,
        });
    }
    partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    Ok(GroupLag {
        group: group.to_owned(),
        state,
        members,
        total_lag: partitions.iter().map(|p| p.lag).sum(),
        max_lag_seconds: partitions
            .iter()
            .filter_map(|p| p.lag_seconds)
            .reduce(f64::max),
        partitions,
    })
}

/// The group's state and members, each with the partitions it owns.
fn describe(consumer: &BaseConsumer, group: &str) -> Result<(String, Vec<Member>), KafkaFailure> {
    let list = consumer
        .fetch_group_list(Some(group), TIMEOUT)
        .map_err(KafkaFailure::Client)?;
    let Some(info) = list.groups().iter().find(|g| g.name() == group) else {
        return Ok(("Unknown".into(), Vec::new()));
    };
    let members = info
        .members()
        .iter()
        .map(|m| Member {
            id: m.id().to_owned(),
            client_id: m.client_id().to_owned(),
            host: m.client_host().to_owned(),
            partitions: m.assignment().map(assignment).unwrap_or_default(),
        })
        .collect();
    Ok((info.state().to_owned(), members))
}

/// Decodes a consumer protocol assignment (version, then per topic its
/// name and partitions) into "topic/partition" strings; what it cannot
/// read it leaves out.
fn assignment(bytes: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut at = 2; // version (i16)
    let take = |at: &mut usize, n: usize| -> Option<&[u8]> {
        let slice = bytes.get(*at..*at + n)?;
        *at += n;
        Some(slice)
    };
    let i32_at = |at: &mut usize| take(at, 4).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    let Some(topics) = i32_at(&mut at) else {
        return out;
    };
    for _ in 0..topics.max(0) {
        let Some(len) = take(&mut at, 2).map(|b| i16::from_be_bytes([b[0], b[1]])) else {
            return out;
        };
        let Some(name) =
            take(&mut at, len.max(0) as usize).map(|b| String::from_utf8_lossy(b).into_owned())
        else {
            return out;
        };
        let Some(count) = i32_at(&mut at) else {
            return out;
        };
        for _ in 0..count.max(0) {
            let Some(partition) = i32_at(&mut at) else {
                return out;
            };
            out.push(format!("{name}/{partition}"));
        }
    }
    out
}

/// Seconds since the record at `offset` was written, read by assigning the
/// partition (never joining or committing for a group).
fn oldest_age(consumer: &BaseConsumer, topic: &str, partition: i32, offset: i64) -> Option<f64> {
    let mut at = TopicPartitionList::new();
    at.add_partition_offset(topic, partition, Offset::Offset(offset))
        .ok()?;
    consumer.assign(&at).ok()?;
    // The client is reused across partitions: skip anything fetched for the
    // one assigned before.
    let deadline = std::time::Instant::now() + TIMEOUT;
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        let message = consumer.poll(left)?.ok()?;
        if message.topic() == topic && message.partition() == partition {
            let written = message.timestamp().to_millis()?;
            return Some(clock::now_ms().saturating_sub(written.max(0) as u64) as f64 / 1000.0);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_assignment_is_decoded() {
        // Version 0; one topic "t" with partitions 0 and 2; no user data.
        let bytes = [
            0, 0, 0, 0, 0, 1, 0, 1, b't', 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0,
        ];
        assert_eq!(assignment(&bytes), vec!["t/0", "t/2"]);
        assert!(assignment(&[0, 0]).is_empty());
        assert_eq!(assignment(&bytes[..17]), vec!["t/0"], "cut short");
    }
}
