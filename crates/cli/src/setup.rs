//! `flashsale setup --check`: whether an existing deployment's topics,
//! tables and Redis are shaped as the services expect, changing nothing.
//! What differs is said, one line each, with what is expected.

use std::fmt;

use flashsale_core::bus::kafka::{self, TopicShape};
use flashsale_core::dynamo::{self, TableShape, Tables};
use flashsale_core::service::redis_conn;

use crate::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Differs,
    /// The store would not say (a managed Redis refusing `CONFIG`).
    Unknown,
}

/// One thing looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub verdict: Verdict,
    /// `kafka topic <name>`, `dynamodb table <name>`, `redis`.
    pub subject: String,
    pub detail: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = match self.verdict {
            Verdict::Ok => "ok     ",
            Verdict::Differs => "DIFFERS",
            Verdict::Unknown => "unknown",
        };
        write!(f, "{mark} {}: {}", self.subject, self.detail)
    }
}

fn finding(verdict: Verdict, subject: String, detail: impl Into<String>) -> Finding {
    Finding {
        verdict,
        subject,
        detail: detail.into(),
    }
}

/// Looks at every topic, table and Redis setting the services rely on.
pub async fn check(config: &Config) -> anyhow::Result<Vec<Finding>> {
    let mut findings = check_topics(config).await?;
    findings.extend(check_tables(config).await?);
    findings.extend(check_redis(config).await);
    Ok(findings)
}

async fn check_topics(config: &Config) -> anyhow::Result<Vec<Finding>> {
    let settings = &config.kafka;
    let names = kafka::pipeline_topics(settings);
    let shapes = kafka::describe_topics(settings, names.clone()).await?;
    let wanted = TopicShape {
        partitions: usize::try_from(settings.partitions).unwrap_or(0),
        replicas: usize::try_from(settings.replication_factor).unwrap_or(0),
    };
    Ok(names
        .into_iter()
        .map(|name| {
            let subject = format!("kafka topic {name}");
            match shapes.get(&name) {
                None => finding(
                    Verdict::Differs,
                    subject,
                    "missing (`flashsale setup` creates it)",
                ),
                Some(shape) if *shape == wanted => finding(
                    Verdict::Ok,
                    subject,
                    format!(
                        "{} partitions, {} replicas",
                        shape.partitions, shape.replicas
                    ),
                ),
                Some(shape) => finding(
                    Verdict::Differs,
                    subject,
                    format!(
                        "{} partitions and {} replicas; the settings say {} and {} \
                         (FLASHSALE_KAFKA_PARTITIONS, FLASHSALE_KAFKA_REPLICATION_FACTOR)",
                        shape.partitions, shape.replicas, wanted.partitions, wanted.replicas
                    ),
                ),
            }
        })
        .collect())
}

async fn check_tables(config: &Config) -> anyhow::Result<Vec<Finding>> {
    let client = dynamo::client(&config.dynamo).await;
    let tables = Tables::new(&config.dynamo);
    let mut findings = Vec::new();
    for (table, key) in dynamo::expected_tables(&tables) {
        let subject = format!("dynamodb table {table}");
        let shape = dynamo::describe_table(&client, table).await?;
        findings.push(match shape {
            None => finding(
                Verdict::Differs,
                subject,
                "missing (`flashsale setup` creates it)",
            ),
            Some(shape) => judge_table(subject, key, &shape),
        });
    }
    Ok(findings)
}

fn judge_table(subject: String, key: &str, shape: &TableShape) -> Finding {
    let wanted_key = Some((key.to_owned(), "S".to_owned()));
    let mut wrong = Vec::new();
    if shape.hash_key != wanted_key || shape.sort_key {
        wrong.push(format!(
            "its key is {:?}{}, expected the string hash key {key} alone",
            shape.hash_key,
            if shape.sort_key {
                " with a sort key"
            } else {
                ""
            }
        ));
    }
    if !shape.active {
        wrong.push("not active".to_owned());
    }
    if wrong.is_empty() {
        // Provisioned capacity works, but a sale's opening second would be
        // throttled unless it was raised beforehand.
        let detail = match shape.billing.as_str() {
            "PAY_PER_REQUEST" => format!("key {key}, on-demand"),
            other => format!("key {key}, {other} (on-demand suits a sale's burst better)"),
        };
        finding(Verdict::Ok, subject, detail)
    } else {
        finding(Verdict::Differs, subject, wrong.join("; "))
    }
}

async fn check_redis(config: &Config) -> Vec<Finding> {
    let subject = "redis".to_owned();
    let mut conn = match redis_conn::connect(&config.redis).await {
        Ok(conn) => conn,
        Err(error) => {
            return vec![finding(
                Verdict::Differs,
                subject,
                format!("unreachable: {error}"),
            )];
        }
    };
    let asked: Result<Vec<String>, _> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("appendfsync")
        .query_async(&mut conn)
        .await;
    let appendonly: Result<Vec<String>, _> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("appendonly")
        .query_async(&mut conn)
        .await;
    match (asked, appendonly) {
        (Ok(fsync), Ok(aof)) => {
            let (fsync, aof) = (fsync.get(1).cloned(), aof.get(1).cloned());
            if fsync.as_deref() == Some("always") && aof.as_deref() == Some("yes") {
                vec![finding(
                    Verdict::Ok,
                    subject,
                    "appendonly yes, appendfsync always",
                )]
            } else {
                vec![finding(
                    Verdict::Differs,
                    subject,
                    format!(
                        "appendonly {}, appendfsync {}: an acknowledged reservation can be lost in a crash \
                         (README, \"Losing Redis\"); expected appendonly yes, appendfsync always",
                        aof.unwrap_or_default(),
                        fsync.unwrap_or_default()
                    ),
                )]
            }
        }
        (Err(error), _) | (_, Err(error)) => vec![finding(
            Verdict::Unknown,
            subject,
            format!(
                "reachable, but it would not show its persistence ({error}); make sure it runs with \
                 appendonly yes and appendfsync always"
            ),
        )],
    }
}
