//! Kafka plumbing: what every client shares (the cluster's settings, the
//! topic and group names, the failures) and topic creation here; the
//! producer every stage sends with (`producer`), the `traceparent` header
//! a purchase carries through the pipeline (`trace`), and setting a
//! message aside, to its dead-letter topic or parked at its topic's tail
//! (`aside`).
//!
//! The producer is idempotent with `acks=all`: a send that returned `Ok`
//! is durable on the broker, which is what the gateway's `202` and every
//! worker's offset commit rely on.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage, ToBytes};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::ids::RequestId;
use crate::service::settings::KafkaSettings;

mod aside;
mod producer;
mod trace;

pub use aside::{Aside, dead_letter, dead_letter_error, park, parked_times, set_aside};
pub use producer::{RenewableProducer, probe, producer, send};
pub use trace::{
    TRACEPARENT, continue_trace, header, headers_with_trace, trace_headers, traceparent,
};

/// Base names of the pipeline's topics; `KafkaSettings::topic` adds the prefix.
pub mod topic {
    pub const PURCHASE_REQUESTS: &str = "purchase-requests";
    pub const RESERVATIONS: &str = "reservations";
    pub const STOCK_RELEASES: &str = "stock-releases";
    pub const ALL: [&str; 3] = [PURCHASE_REQUESTS, RESERVATIONS, STOCK_RELEASES];

    pub fn dead_letter(topic: &str) -> String {
        format!("{topic}.dlq")
    }
}

/// Base names of the consumer groups; `KafkaSettings::group` adds the prefix.
pub mod group {
    pub const SHOP: &str = "flashsale-shop";
    pub const ORDERS: &str = "flashsale-orders";
}

#[derive(Debug, thiserror::Error)]
pub enum KafkaFailure {
    #[error("creating the Kafka client failed: {0}")]
    Client(#[source] KafkaError),
    #[error("creating topic {topic} failed: {code}")]
    CreateTopic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("the broker did not acknowledge the message: {0}")]
    Produce(#[source] KafkaError),
    #[error("Kafka is unreachable: {0}")]
    Unreachable(#[source] KafkaError),
}

/// Options every client gets: where the cluster is, and no topic ever
/// created behind our back by a metadata request.
pub fn base_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.bootstrap)
        .set("allow.auto.create.topics", "false")
        .set("socket.keepalive.enable", "true");
    if let Some(contexts) = &settings.debug {
        config.set("debug", contexts);
    }
    for (key, value) in settings.security.client_properties() {
        config.set(key, value);
    }
    config
}

/// Every topic of the pipeline and its dead-letter twin, by full name.
pub fn pipeline_topics(settings: &KafkaSettings) -> Vec<String> {
    topic::ALL
        .iter()
        .flat_map(|base| {
            let name = settings.topic(base);
            [name.clone(), topic::dead_letter(&name)]
        })
        .collect()
}

/// How a topic is laid out on the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicShape {
    pub partitions: usize,
    /// The fewest replicas any of its partitions has.
    pub replicas: usize,
}

/// The shape of each of `names` that exists. Asked topic by topic: tansu
/// 0.6 drops the connection on a metadata request for all topics.
pub async fn describe_topics(
    settings: &KafkaSettings,
    names: Vec<String>,
) -> Result<BTreeMap<String, TopicShape>, KafkaFailure> {
    let config = base_config(settings);
    tokio::task::spawn_blocking(move || -> Result<_, KafkaError> {
        let client: BaseConsumer = config.create()?;
        let mut shapes = BTreeMap::new();
        for name in names {
            let metadata = client.fetch_metadata(Some(&name), Duration::from_secs(10))?;
            let found = metadata
                .topics()
                .iter()
                .find(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty());
            if let Some(topic) = found {
                let shape = TopicShape {
                    partitions: topic.partitions().len(),
                    replicas: topic
                        .partitions()
                        .iter()
                        .map(|p| p.replicas().len())
                        .min()
                        .unwrap_or(0),
                };
                shapes.insert(name, shape);
            }
        }
        Ok(shapes)
    })
    .await
    .map_err(|_| KafkaFailure::Unreachable(KafkaError::Canceled))?
    .map_err(KafkaFailure::Unreachable)
}

/// Creates every topic of the pipeline and its dead-letter twin that does
/// not exist yet. Safe to call from every service at start: once the topics
/// exist it only reads metadata. Missing topics are created one request
/// each, because tansu 0.6 stalled (admin timeouts) when many services sent
/// multi-topic CreateTopics requests at the same moment.
pub async fn ensure_topics(settings: &KafkaSettings) -> Result<(), KafkaFailure> {
    let admin: AdminClient<DefaultClientContext> = base_config(settings)
        .create()
        .map_err(KafkaFailure::Client)?;
    let wanted = pipeline_topics(settings);
    let existing = describe_topics(settings, wanted.clone()).await?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for name in wanted.iter().filter(|name| !existing.contains_key(*name)) {
        let new = NewTopic::new(
            name,
            settings.partitions,
            TopicReplication::Fixed(settings.replication_factor),
        );
        let results = admin
            .create_topics([&new], &options)
            .await
            .map_err(KafkaFailure::Unreachable)?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => return Err(KafkaFailure::CreateTopic { topic, code }),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::settings::Env;
    use crate::service::settings::{KAFKA_TLS_BUILT, KafkaSecurity, KafkaSettings};

    /// librdkafka takes TLS and SCRAM settings exactly when this build says
    /// it has them (`kafka-tls`), so the refusal at start is never wrong.
    #[test]
    fn librdkafka_takes_tls_settings_exactly_when_the_build_has_them() {
        let mut settings =
            KafkaSettings::from_env(&Env::from_map(Default::default())).expect("default settings");
        settings.security = KafkaSecurity {
            protocol: "sasl_ssl".into(),
            sasl_mechanism: Some("SCRAM-SHA-512".into()),
            sasl_username: Some("shop".into()),
            sasl_password: Some("secret".into()),
            ssl_ca_location: None,
        };
        let made = base_config(&settings).create::<BaseConsumer>();
        assert_eq!(
            made.is_ok(),
            KAFKA_TLS_BUILT,
            "kafka-tls built: {KAFKA_TLS_BUILT}; librdkafka said {:?}",
            made.err()
        );
    }
}
