//! `flashsale setup --check` against the real stores: what is missing or
//! shaped otherwise than the settings say is named, and nothing changes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure here is the test's answer

use flashsale_testkit::env_with;
use flashsale_testkit::flashsale_cli::Config;
use flashsale_testkit::flashsale_cli::setup::{Finding, Verdict, check};
use flashsale_testkit::flashsale_core::bus::kafka;
use flashsale_testkit::flashsale_core::dynamo;

fn config(prefix: &str, partitions: u32) -> Config {
    Config::from_env(&env_with(&[
        ("FLASHSALE_TOPIC_PREFIX", format!("{prefix}.")),
        ("FLASHSALE_TABLE_PREFIX", format!("{prefix}-")),
        ("FLASHSALE_KAFKA_PARTITIONS", partitions.to_string()),
    ]))
    .unwrap()
}

fn of<'a>(findings: &'a [Finding], part: &str) -> Vec<&'a Finding> {
    findings
        .iter()
        .filter(|f| f.subject.starts_with(part))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_check_names_what_differs_and_changes_nothing() {
    let prefix = format!("chk{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
    let wanted = config(&prefix, 2);

    let before = check(&wanted).await.unwrap();
    let (topics, tables) = (of(&before, "kafka topic"), of(&before, "dynamodb table"));
    assert_eq!((topics.len(), tables.len()), (6, 2), "{before:#?}");
    for missing in topics.iter().chain(&tables) {
        assert_eq!(missing.verdict, Verdict::Differs, "{missing}");
        assert!(missing.detail.contains("missing"), "{missing}");
    }
    assert_eq!(
        of(&before, "redis")[0].verdict,
        Verdict::Ok,
        "the test stack's Redis: {before:#?}"
    );
    assert_eq!(
        check(&wanted).await.unwrap(),
        before,
        "looking created nothing"
    );

    // Made by a deployment with other settings: 3 partitions where 2 are wanted.
    let other = config(&prefix, 3);
    kafka::ensure_topics(&other.kafka).await.unwrap();
    let client = dynamo::client(&other.dynamo).await;
    dynamo::ensure_tables(&client, &dynamo::Tables::new(&other.dynamo))
        .await
        .unwrap();
    let after = check(&wanted).await.unwrap();
    for topic in of(&after, "kafka topic") {
        assert_eq!(topic.verdict, Verdict::Differs, "{topic}");
        assert!(topic.detail.contains("3 partitions"), "{topic}");
        assert!(
            topic.detail.contains("FLASHSALE_KAFKA_PARTITIONS"),
            "{topic}"
        );
    }
    for table in of(&after, "dynamodb table") {
        assert_eq!(table.verdict, Verdict::Ok, "{table}");
        assert!(table.detail.contains("on-demand"), "{table}");
    }
    let fine = check(&other).await.unwrap();
    assert!(fine.iter().all(|f| f.verdict == Verdict::Ok), "{fine:#?}");
}
