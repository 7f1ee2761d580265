//! Kafka plumbing: the producer every stage uses, topic creation, the
//! dead-letter path and the `traceparent` header.
//!
//! The producer is idempotent with `acks=all`: a send that returned `Ok`
//! is durable on the broker, which is what the gateway's `202` and every
//! worker's offset commit rely on.

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

pub const TRACEPARENT: &str = "traceparent";
const DLQ_ERROR: &str = "flashsale-error";
const DLQ_ORIGIN: &str = "flashsale-origin";
const PARKED: &str = "flashsale-parked";

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
    config
}

pub fn producer(settings: &KafkaSettings) -> Result<FutureProducer, KafkaFailure> {
    base_config(settings)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        // A flash sale wants its first buyers answered fast, not big batches.
        .set("linger.ms", "1")
        // librdkafka never gives up on a message by itself: we stop waiting
        // after `produce_timeout` (see `send`), and the message goes on
        // until the broker answers. When an idempotent producer times out a
        // message that may be in flight, librdkafka bumps its epoch locally,
        // and tansu 0.6 cannot take a batch with an epoch it did not hand
        // out: its storage task panics and the broker answers nothing again
        // until restarted. A broker that stalls longer than the timeout
        // (tests/broker.rs stalls it 13 s) did exactly that.
        .set("message.timeout.ms", "0")
        .create()
        .map_err(KafkaFailure::Client)
}

/// A producer that is replaced when librdkafka reports a fatal error (an
/// idempotent producer whose sequence the broker can no longer accept):
/// such a producer fails every message from then on, and only a new one
/// can send again.
pub struct RenewableProducer {
    settings: KafkaSettings,
    current: std::sync::RwLock<FutureProducer>,
    renewals: std::sync::atomic::AtomicU64,
    /// Records sent, for the test hook `KafkaSettings::test_fatal_after`.
    sent: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for RenewableProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RenewableProducer")
            .field("renewals", &self.renewals())
            .field("fatal", &self.fatal())
            .finish_non_exhaustive()
    }
}

impl RenewableProducer {
    pub fn new(settings: &KafkaSettings) -> Result<Self, KafkaFailure> {
        Ok(Self {
            settings: settings.clone(),
            current: std::sync::RwLock::new(producer(settings)?),
            renewals: std::sync::atomic::AtomicU64::new(0),
            sent: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The producer to send with now.
    pub fn current(&self) -> FutureProducer {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// `send` with the current producer.
    pub async fn send(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: OwnedHeaders,
        timeout: Duration,
    ) -> Result<(i32, i64), KafkaFailure> {
        let sent = send(&self.current(), topic, key, payload, headers, timeout).await;
        if sent.is_ok()
            && let Some(after) = self.settings.test_fatal_after
            && self.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 == after
        {
            self.inject_fatal_error();
        }
        sent
    }

    /// The fatal error of the current producer, if it had one.
    pub fn fatal(&self) -> Option<String> {
        self.current()
            .client()
            .fatal_error()
            .map(|(code, reason)| format!("{code:?}: {reason}"))
    }

    /// Replaces the producer if it failed fatally; `true` if it did. The
    /// old one's messages fail, and their senders see it.
    pub fn renew_if_fatal(&self) -> Result<bool, KafkaFailure> {
        let Some(why) = self.fatal() else {
            return Ok(false);
        };
        let fresh = producer(&self.settings)?;
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if current.client().fatal_error().is_some() {
            *current = fresh;
            self.renewals
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(%why, "the Kafka producer failed fatally; replaced it");
        }
        Ok(true)
    }

    /// Producers replaced so far.
    pub fn renewals(&self) -> u64 {
        self.renewals.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Replaces the producer as soon as it fails fatally (until then every
    /// send fails, and readiness says why), every 200 ms until `shutdown`;
    /// `renewals` follows how many were replaced.
    pub async fn keep_renewed(
        self: std::sync::Arc<Self>,
        renewals: prometheus::IntGauge,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut every = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => {
                    if let Err(error) = self.renew_if_fatal() {
                        tracing::error!(%error, "cannot make a new Kafka producer; trying again");
                    }
                    renewals.set(self.renewals() as i64);
                }
            }
        }
    }

    /// For tests only: makes the current producer fail as a fatal
    /// idempotence error would (librdkafka's own test hook, which rdkafka
    /// does not wrap: the crate's one unsafe call).
    #[allow(unsafe_code)]
    pub fn inject_fatal_error(&self) {
        let producer = self.current();
        let reason = std::ffi::CString::new("injected by a test").unwrap_or_default();
        // SAFETY: the client pointer is valid while `producer` is held, and
        // librdkafka copies the reason.
        unsafe {
            rdkafka::bindings::rd_kafka_test_fatal_error(
                producer.client().native_ptr(),
                rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                reason.as_ptr(),
            );
        }
    }
}

/// Sends one record and waits up to `timeout` for the broker to
/// acknowledge it.
async fn deliver<K, P>(
    producer: &FutureProducer,
    record: FutureRecord<'_, K, P>,
    timeout: Duration,
) -> Result<(i32, i64), KafkaFailure>
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    match tokio::time::timeout(timeout, producer.send(record, timeout)).await {
        Ok(Ok(delivery)) => Ok((delivery.partition, delivery.offset)),
        Ok(Err((error, _))) => Err(KafkaFailure::Produce(error)),
        Err(_) => Err(KafkaFailure::Produce(KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageTimedOut,
        ))),
    }
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
    let wanted: Vec<String> = topic::ALL
        .iter()
        .flat_map(|base| {
            let name = settings.topic(base);
            [name.clone(), topic::dead_letter(&name)]
        })
        .collect();
    // Asked topic by topic: tansu 0.6 drops the connection on a metadata
    // request for all topics.
    let existing: Vec<String> = {
        let config = base_config(settings);
        let names = wanted.clone();
        tokio::task::spawn_blocking(move || -> Result<Vec<String>, KafkaError> {
            let client: BaseConsumer = config.create()?;
            let mut existing = Vec::new();
            for name in names {
                let metadata = client.fetch_metadata(Some(&name), Duration::from_secs(10))?;
                let found = metadata
                    .topics()
                    .iter()
                    .any(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty());
                if found {
                    existing.push(name);
                }
            }
            Ok(existing)
        })
        .await
        .map_err(|_| KafkaFailure::Unreachable(KafkaError::Canceled))?
        .map_err(KafkaFailure::Unreachable)?
    };
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for name in wanted.iter().filter(|name| !existing.contains(name)) {
        let new = NewTopic::new(name, settings.partitions, TopicReplication::Fixed(1));
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

/// Asks the cluster for the metadata of `topic`: the readiness probe of
/// every service.
pub async fn probe(producer: &FutureProducer, topic: &str) -> Result<(), KafkaFailure> {
    let producer = producer.clone();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        producer
            .client()
            .fetch_metadata(Some(&topic), Duration::from_secs(2))
            .map(|_| ())
    })
    .await
    .map_err(|_| KafkaFailure::Unreachable(KafkaError::Canceled))?
    .map_err(KafkaFailure::Unreachable)
}

/// A W3C `traceparent` whose trace id is the request id, so every log line
/// of one purchase, in every service, can be found from the id the buyer got.
pub fn traceparent(request_id: RequestId) -> String {
    let trace = request_id.to_string().replace('-', "");
    format!("00-{trace}-{:016x}-01", new_span_id())
}

fn new_span_id() -> u64 {
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(1) as u64)
        | 1
}

/// The trace a purchase's records carry: the caller's, when its HTTP
/// request came with a valid `traceparent` (continued with a span of our
/// own), else one named by the request id.
pub fn continue_trace(incoming: Option<&str>, request_id: RequestId) -> String {
    let valid = |part: &str, len: usize| {
        part.len() == len
            && part.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            && part.bytes().any(|b| b != b'0')
    };
    match incoming.map(|raw| raw.trim().split('-').collect::<Vec<_>>()) {
        Some(parts)
            if parts.len() == 4
                && parts[0] == "00"
                && valid(parts[1], 32)
                && valid(parts[2], 16)
                && parts[3].len() == 2
                && parts[3].bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            format!("00-{}-{:016x}-{}", parts[1], new_span_id(), parts[3])
        }
        _ => traceparent(request_id),
    }
}

pub fn trace_headers(request_id: RequestId) -> OwnedHeaders {
    headers_with_trace(&traceparent(request_id))
}

pub fn headers_with_trace(traceparent: &str) -> OwnedHeaders {
    OwnedHeaders::new().insert(Header {
        key: TRACEPARENT,
        value: Some(traceparent),
    })
}

/// The value of one header of a message, as text.
pub fn header(message: &impl Message, key: &str) -> Option<String> {
    message.headers().and_then(|headers| {
        headers
            .iter()
            .find(|h| h.key == key)
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    })
}

/// Sends one record and waits for the broker's acknowledgement.
pub async fn send(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: &[u8],
    headers: OwnedHeaders,
    timeout: Duration,
) -> Result<(i32, i64), KafkaFailure> {
    let record = FutureRecord::to(topic)
        .key(key)
        .payload(payload)
        .headers(headers);
    deliver(producer, record, timeout).await
}

/// Puts a message that cannot be processed on `<topic>.dlq`, with the reason
/// and where it came from, so one bad message never stops a partition.
pub async fn dead_letter(
    producer: &FutureProducer,
    message: &OwnedMessage,
    error: &str,
    timeout: Duration,
) -> Result<(), KafkaFailure> {
    let origin = origin(message);
    let headers = [(DLQ_ERROR, error), (DLQ_ORIGIN, origin.as_str())];
    copy(
        producer,
        message,
        &topic::dead_letter(message.topic()),
        &headers,
        timeout,
    )
    .await
}

/// Puts a message whose processing gave up (a store that kept failing past
/// its deadline) back at the tail of its own topic, under its key, with
/// how often it was parked and why; the worker then completes the original
/// and its partition moves on. Processing is idempotent by request id, so
/// the copy resumes the purchase where the stores say it stopped.
pub async fn park(
    producer: &FutureProducer,
    message: &OwnedMessage,
    reason: &str,
    timeout: Duration,
) -> Result<(), KafkaFailure> {
    let parked = (parked_times(message) + 1).to_string();
    let origin = origin(message);
    let headers = [
        (PARKED, parked.as_str()),
        (DLQ_ERROR, reason),
        (DLQ_ORIGIN, origin.as_str()),
    ];
    copy(producer, message, message.topic(), &headers, timeout).await
}

/// Where a message that cannot be processed now goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aside {
    /// To `<topic>.dlq`: it can never be processed (`dead_letter`).
    DeadLetter,
    /// To the tail of its own topic: a store kept failing for it (`park`).
    Park,
}

/// Moves `message` out of its partition's way, retrying until Kafka takes
/// it (`Err` only on shutdown); the caller then completes the original.
pub async fn set_aside(
    producer: &RenewableProducer,
    message: &OwnedMessage,
    why: &str,
    to: Aside,
    timeout: Duration,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<(), crate::bus::consumer::Abandoned> {
    tracing::warn!(topic = message.topic(), offset = message.offset(), ?to, parked_before = parked_times(message), %why, "setting a message aside");
    crate::service::retry::durable("set a message aside", shutdown, || async move {
        match to {
            Aside::DeadLetter => dead_letter(&producer.current(), message, why, timeout).await,
            Aside::Park => park(&producer.current(), message, why, timeout).await,
        }
    })
    .await
}

/// How often a message was parked before (0 for an original).
pub fn parked_times(message: &impl Message) -> u32 {
    header(message, PARKED)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn origin(message: &OwnedMessage) -> String {
    format!(
        "{}/{}/{}",
        message.topic(),
        message.partition(),
        message.offset()
    )
}

/// `message`'s key and payload to `to`, with `headers` and its trace.
async fn copy(
    producer: &FutureProducer,
    message: &OwnedMessage,
    to: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<(), KafkaFailure> {
    let mut owned = OwnedHeaders::new();
    for (key, value) in headers {
        owned = owned.insert(Header {
            key,
            value: Some(*value),
        });
    }
    if let Some(parent) = header(message, TRACEPARENT) {
        owned = owned.insert(Header {
            key: TRACEPARENT,
            value: Some(&parent),
        });
    }
    let mut record = FutureRecord::<[u8], [u8]>::to(to).headers(owned);
    if let Some(key) = message.key() {
        record = record.key(key);
    }
    if let Some(payload) = message.payload() {
        record = record.payload(payload);
    }
    deliver(producer, record, timeout).await.map(|_| ())
}

/// The error recorded with a dead-lettered message.
pub fn dead_letter_error(message: &impl Message) -> Option<String> {
    header(message, DLQ_ERROR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_w3c_shaped_and_carries_the_request_id() {
        let id = RequestId::fresh();
        let tp = traceparent(id);
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(parts[0], "00");
        assert_eq!(parts[1], id.to_string().replace('-', ""));
        assert_eq!(parts[2].len(), 16);
        assert_eq!(parts[3], "01");
    }

    #[test]
    fn a_callers_trace_is_continued_and_garbage_ignored() {
        let id = RequestId::fresh();
        let theirs = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ours = continue_trace(Some(theirs), id);
        assert!(ours.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(ours.ends_with("-01"));
        assert_ne!(ours, theirs, "a span of our own");
        let own_trace = id.to_string().replace('-', "");
        for garbage in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf9-00f067aa0ba902b7-01",
            "ünïcödé",
        ] {
            let got = continue_trace(Some(garbage), id);
            assert_eq!(
                got.split('-').nth(1),
                Some(own_trace.as_str()),
                "{garbage:?}"
            );
        }
    }
}
