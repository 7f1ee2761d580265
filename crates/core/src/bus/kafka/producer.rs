//! The producer every stage sends with: idempotent, `acks=all`, and
//! replaced when librdkafka declares it fatally failed
//! (`RenewableProducer`).

use super::*;

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
pub(super) async fn deliver<K, P>(
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
