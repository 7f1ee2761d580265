//! Setting a message aside: to its topic's dead-letter twin (a message no
//! retry can help), or parked at the tail of its own topic (one that gave
//! up for now, to be tried again after the messages behind it).

use super::producer::deliver;
use super::*;

const DLQ_ERROR: &str = "flashsale-error";

const DLQ_ORIGIN: &str = "flashsale-origin";

const PARKED: &str = "flashsale-parked";

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
