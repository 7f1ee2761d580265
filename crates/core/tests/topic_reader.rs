//! Reading a topic as data (recovery, audits): every partition the broker
//! has, whatever this deployment's settings say.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure here is the test's answer

use std::time::Duration;

use flashsale_core::bus::kafka::{self, topic};
use flashsale_core::bus::topic_reader;
use flashsale_core::service::settings::{Env, KafkaSettings};

/// A topic made with more partitions than the settings that later read it
/// name (partitions added, or a setting changed since): every record of
/// every partition is read, none is missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_partition_the_broker_has_is_read() {
    let mut made = KafkaSettings::from_env(&Env::process()).expect("settings");
    made.prefix = format!("r{}.", &uuid::Uuid::now_v7().simple().to_string()[20..]);
    made.partitions = 6;
    kafka::ensure_topics(&made).await.expect("topics");
    let name = made.topic(topic::RESERVATIONS);
    let producer = kafka::producer(&made).expect("producer");
    for n in 0..24 {
        kafka::send(
            &producer,
            &name,
            &format!("key-{n}"),
            format!("r{n}").as_bytes(),
            kafka::headers_with_trace("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            made.produce_timeout,
        )
        .await
        .expect("produced");
    }
    let mut reading = made.clone();
    reading.partitions = 3;
    let ranges = topic_reader::watermarks(&reading, &name)
        .await
        .expect("watermarks");
    assert_eq!(ranges.len(), 6, "{ranges:?}");
    let records = topic_reader::read(&reading, &name, ranges, Duration::from_secs(30))
        .await
        .expect("records");
    assert_eq!(records.len(), 24);
    let committed = topic_reader::committed(&reading, &made.group("nobody"), &name)
        .await
        .expect("committed offsets");
    assert_eq!(committed.len(), 6, "{committed:?}");
}
