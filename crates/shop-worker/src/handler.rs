//! A shop-worker's message handler: a purchase request is reserved (or
//! waits in the line, or is rejected) by `reserve.lua` and its buyer told;
//! a stock release gives units back and tells the buyer `cancelled`. What
//! cannot be done now is set aside: to the DLQ when it never can be, parked
//! at the tail of its topic when Redis kept failing for it, or held apart
//! while its sku waits for its recovery.

use std::collections::HashMap;
use std::sync::Arc;

use flashsale_core::bus::consumer::{self, Abandoned, Completion, Handler};
use flashsale_core::bus::kafka::{self, Aside};
use flashsale_core::bus::messages::{self, PurchaseRequest, StockRelease};
use flashsale_core::clock;
use flashsale_core::ids::Sku;
use flashsale_core::service::retry::{self, Stop};
use flashsale_core::status::board::Subject;
use flashsale_core::status::{PurchaseState, reason};
use flashsale_core::stock::{Announcement, Answered, ReleaseOutcome, ReserveOutcome, StockError};
use prometheus::IntGauge;
use rdkafka::message::{Message, OwnedMessage};
use tracing::Instrument;

use crate::Shop;

/// The skus whose stock Redis lost, each with the gate its purchases pass
/// in arrival order once it is recovered.
#[derive(Default)]
pub(crate) struct LostSkus {
    gates: std::sync::Mutex<HashMap<Sku, Arc<tokio::sync::Mutex<()>>>>,
}

impl LostSkus {
    fn gate(&self, sku: &Sku) -> Arc<tokio::sync::Mutex<()>> {
        let mut gates = self.gates.lock().unwrap_or_else(|e| e.into_inner());
        // A gate nobody holds or waits at is of a sku recovered since.
        gates.retain(|_, gate| Arc::strong_count(gate) > 1);
        gates
            .entry(sku.clone())
            .or_insert_with(|| {
                tracing::error!(%sku, "Redis holds no stock for this sku: its purchases wait for `flashsale recover --sku {sku}`; the other skus go on");
                Arc::default()
            })
            .clone()
    }
}

/// Counts one in a gauge for as long as it lives.
struct Counted(IntGauge);

impl Counted {
    fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

pub(crate) struct ShopHandler(pub(crate) Arc<Shop>);

impl Handler for ShopHandler {
    async fn start(&self, message: OwnedMessage) -> Result<Completion, Abandoned> {
        let shop = self.0.clone();
        if message.topic() == shop.release_topic {
            shop.release(message).await
        } else {
            shop.reserve(message).await
        }
    }
}

impl Shop {
    async fn reserve(self: Arc<Self>, message: OwnedMessage) -> Result<Completion, Abandoned> {
        let request: PurchaseRequest = match messages::decode(message.payload()) {
            Ok(request) => request,
            Err(error) => {
                return self
                    .set_aside(message, error.to_string(), Aside::DeadLetter)
                    .await;
            }
        };
        let span =
            tracing::info_span!("reserve", request_id = %request.request_id, sku = %request.sku);
        // A script answer we do not understand is a bug, not bad input:
        // stop rather than guess and move stock. A Redis that keeps failing
        // (this sku's node of a cluster down, writes refused) parks the
        // purchase rather than holding every purchase behind it.
        // A sku whose stock Redis lost answers `None`: its purchase waits
        // for the recovery apart (`await_recovery`), and the purchases of
        // every other sku go on behind it.
        let answered =
            match retry::durable_until("reserve", &self.shutdown, self.deadline(), || {
                self.reserve_loaded(&request)
            })
            .instrument(span.clone())
            .await
            {
                Ok(Some(answered)) => answered,
                Ok(None) => {
                    return Ok(Box::pin(
                        self.await_recovery(message, request).instrument(span),
                    ));
                }
                Err(Stop::Abandoned(abandoned)) => return Err(abandoned),
                Err(Stop::GaveUp(why)) => return self.set_aside(message, why, Aside::Park).await,
            };
        Ok(Box::pin(
            self.tell(message, request, answered).instrument(span),
        ))
    }

    /// One reserve call; `None` when Redis holds no stock for the sku.
    async fn reserve_loaded(
        &self,
        request: &PurchaseRequest,
    ) -> Result<Option<Answered<ReserveOutcome>>, StockError> {
        loaded(
            self.stock
                .reserve(request, clock::now_ms(), self.max_queue_age_ms),
        )
        .await
    }

    /// Tells the buyer (and the line) what the reserve script decided.
    async fn tell(
        self: Arc<Self>,
        message: OwnedMessage,
        request: PurchaseRequest,
        answered: Answered<ReserveOutcome>,
    ) -> Result<(), Abandoned> {
        let label = answered.outcome.label();
        self.metrics.reservations.with_label_values(&[label]).inc();
        tracing::debug!(outcome = label, decided = answered.line.len(), "reserve");
        let mine = self.herald.tell(
            &request.sku,
            request.request_id,
            &request.user_id,
            request.quantity,
            &answered.outcome,
            &self.shutdown,
        );
        let line = self.tell_line(&request.sku, &answered.line);
        let told = tokio::try_join!(mine, line).map(|_| ());
        self.parked_if_given_up(message, told).await
    }

    /// A purchase of a sku whose stock Redis lost waits for
    /// `flashsale recover --sku`, behind the earlier purchases of the same
    /// sku (arrival order is kept); when it is rebuilt, the purchase is
    /// reserved as if it had just arrived. One that outwaits the queue
    /// cutoff first is rejected `stale`, as it would be after the recovery.
    async fn await_recovery(
        self: Arc<Self>,
        message: OwnedMessage,
        request: PurchaseRequest,
    ) -> Result<(), Abandoned> {
        let _counted = Counted::new(&self.metrics.awaiting_stock);
        let gate = self.lost.gate(&request.sku);
        let _turn = gate.lock().await;
        let mut backoff = retry::Backoff::default();
        loop {
            let age = clock::now_ms().saturating_sub(request.accepted_at_ms);
            if age > self.max_queue_age_ms {
                let subject = Subject {
                    id: request.request_id,
                    sku: &request.sku,
                    user: &request.user_id,
                    quantity: request.quantity,
                };
                self.metrics
                    .reservations
                    .with_label_values(&[reason::STALE])
                    .inc();
                let told = self
                    .post(&subject, PurchaseState::Rejected, Some(reason::STALE))
                    .await;
                return self.parked_if_given_up(message, told).await;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => {
                    return Err(Abandoned("shutting down while a sku waits for its recovery".into()));
                }
                _ = tokio::time::sleep(backoff.next_wait()) => {}
            }
            match self.reserve_loaded(&request).await {
                Ok(Some(answered)) => return self.clone().tell(message, request, answered).await,
                Ok(None) => {}
                Err(error) if error.is_transient() => {
                    tracing::warn!(%error, "reserve failed while the sku waits for its recovery");
                }
                Err(error) => return Err(Abandoned(format!("reserve: {error}"))),
            }
        }
    }

    /// Tells the waiters a script decided for, counted by outcome.
    pub(crate) async fn tell_line(&self, sku: &Sku, line: &[Announcement]) -> Result<(), Stop> {
        for waiter in line {
            // A unit that came back and went to a waiter.
            let label = match &waiter.outcome {
                ReserveOutcome::Reserved { .. } => "served",
                other => other.label(),
            };
            self.metrics.line.with_label_values(&[label]).inc();
        }
        self.herald.announce(sku, line, &self.shutdown).await
    }

    /// Posts a purchase's state once its effect is durable.
    pub(crate) async fn post(
        &self,
        subject: &Subject<'_>,
        state: PurchaseState,
        reason: Option<&str>,
    ) -> Result<(), Stop> {
        self.herald
            .post(subject, state, reason, &self.shutdown)
            .await
    }

    async fn release(self: Arc<Self>, message: OwnedMessage) -> Result<Completion, Abandoned> {
        let release: StockRelease = match messages::decode(message.payload()) {
            Ok(release) => release,
            Err(error) => {
                return self
                    .set_aside(message, error.to_string(), Aside::DeadLetter)
                    .await;
            }
        };
        let released = retry::durable_until("release", &self.shutdown, self.deadline(), || {
            self.stock.release(
                &release.sku,
                release.request_id,
                &release.reason,
                clock::now_ms(),
            )
        })
        .await;
        let Answered { outcome, line } = match released {
            Ok(answered) => answered,
            Err(Stop::Abandoned(abandoned)) => return Err(abandoned),
            Err(Stop::GaveUp(why)) => return self.set_aside(message, why, Aside::Park).await,
        };
        let label = outcome.label();
        self.metrics.releases.with_label_values(&[label]).inc();
        tracing::debug!(request_id = %release.request_id, sku = %release.sku, outcome = %label, reason = %release.reason, "stock release");
        if outcome == ReleaseOutcome::WasCommitted {
            // A sold unit is never given back, and its order is confirmed:
            // a release for it is a bug upstream, not a cancellation.
            tracing::error!(request_id = %release.request_id, "release asked for a committed reservation; ignored");
            return Ok(consumer::done());
        }
        // The units are back (now or by an earlier delivery): only now is
        // the purchase settled as cancelled.
        Ok(Box::pin(async move {
            let subject = Subject {
                id: release.request_id,
                sku: &release.sku,
                user: &release.user_id,
                quantity: release.quantity,
            };
            // The reason of the release that happened first: if the sweep
            // expired the reservation before this release arrived, the buyer
            // is told it expired.
            let reason = match &outcome {
                ReleaseOutcome::Released { reason } => reason.as_str(),
                _ => release.reason.as_str(),
            };
            // The units went to the head of the line: its buyers hear now.
            let cancelled = self.post(&subject, PurchaseState::Cancelled, Some(reason));
            let line = self.tell_line(&release.sku, &line);
            let told = tokio::try_join!(cancelled, line).map(|_| ());
            self.parked_if_given_up(message, told).await
        }))
    }

    /// When a Redis call for this message gives up.
    pub(crate) fn deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.give_up_after
    }

    /// Moves a message out of the way so that its partition goes on: to
    /// its DLQ when it can never be processed, or back to the tail of its
    /// topic when Redis kept failing for it.
    async fn set_aside(
        self: Arc<Self>,
        message: OwnedMessage,
        why: String,
        to: Aside,
    ) -> Result<Completion, Abandoned> {
        Ok(Box::pin(
            async move { self.put_aside(&message, &why, to).await },
        ))
    }

    /// The end of a message's work. When a store kept failing past its
    /// deadline, the message goes back to the tail of its topic and its
    /// partition moves on: processing is idempotent by request id, so the
    /// copy resumes where Redis says the purchase stopped.
    async fn parked_if_given_up(
        &self,
        message: OwnedMessage,
        work: Result<(), Stop>,
    ) -> Result<(), Abandoned> {
        match work {
            Ok(()) => Ok(()),
            Err(Stop::Abandoned(abandoned)) => Err(abandoned),
            Err(Stop::GaveUp(why)) => self.put_aside(&message, &why, Aside::Park).await,
        }
    }

    /// `kafka::set_aside`, counted by where the message went.
    async fn put_aside(
        &self,
        message: &OwnedMessage,
        why: &str,
        to: Aside,
    ) -> Result<(), Abandoned> {
        let counter = match to {
            Aside::DeadLetter => &self.metrics.dead_letters,
            Aside::Park => &self.metrics.parked,
        };
        counter.with_label_values(&[message.topic()]).inc();
        kafka::set_aside(
            &self.producer,
            message,
            why,
            to,
            self.produce_timeout,
            &self.shutdown,
        )
        .await
    }
}

/// A stock call's answer; `None` when Redis holds no stock for the sku.
pub(crate) async fn loaded<T>(
    call: impl std::future::Future<Output = Result<T, StockError>>,
) -> Result<Option<T>, StockError> {
    match call.await {
        Err(StockError::Unloaded(_)) => Ok(None),
        answered => answered.map(Some),
    }
}
