//! Telling a buyer what the stock scripts decided about their purchase:
//! its reservation published for the order stage, then its status posted.
//!
//! A shop-worker tells the buyer of the request it is handling; any script
//! that gives units back, or shortens a sku's line, may also decide for
//! buyers waiting in the line (`lua/line.lua`), who are told by the same
//! code and then acknowledged, so the sweep does not tell them again. A
//! worker that dies before acknowledging leaves them in the line's outbox,
//! and the sweep tells them after a grace period: publishing a reservation
//! twice and posting a status twice are both harmless.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::bus::messages::{self, Reservation, SCHEMA_VERSION};
use crate::ids::{Quantity, RequestId, Sku, UserId};
use crate::service::retry::Stop;
use crate::service::settings::KafkaSettings;
use crate::status::PurchaseState;
use crate::status::board::{StatusBoard, Subject};
use crate::stock::{Announcement, ReserveOutcome, StockStore};
use crate::{bus::kafka, clock, service::retry};

#[derive(Debug, Clone)]
pub struct Herald {
    pub stock: StockStore,
    pub board: StatusBoard,
    pub producer: std::sync::Arc<kafka::RenewableProducer>,
    pub reservation_topic: String,
    pub produce_timeout: Duration,
    /// How long one telling retries a store before it gives up
    /// (`FLASHSALE_RETRY_DEADLINE_MS`): the caller then parks its message,
    /// and waiters left unacknowledged are told again by the sweep.
    pub give_up_after: Duration,
}

impl Herald {
    /// Reservations go to the deployment's `reservations` topic.
    pub fn new(
        stock: StockStore,
        board: StatusBoard,
        producer: std::sync::Arc<kafka::RenewableProducer>,
        kafka: &KafkaSettings,
        give_up_after: Duration,
    ) -> Self {
        Self {
            stock,
            board,
            producer,
            reservation_topic: kafka.topic(kafka::topic::RESERVATIONS),
            produce_timeout: kafka.produce_timeout,
            give_up_after,
        }
    }

    fn deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.give_up_after
    }

    /// Publishes a reservation (key = request id) before its status, so a
    /// buyer never reads `reserved` for a purchase the order stage will
    /// not see; a waiting or rejected purchase only gets its status.
    pub async fn tell(
        &self,
        sku: &Sku,
        id: RequestId,
        user: &UserId,
        quantity: Quantity,
        outcome: &ReserveOutcome,
        shutdown: &CancellationToken,
    ) -> Result<(), Stop> {
        let (state, reason) = match outcome {
            ReserveOutcome::Reserved {
                expires_at_ms,
                amount_cents,
                sale_id,
            } => {
                let reservation = Reservation {
                    v: SCHEMA_VERSION,
                    request_id: id,
                    sku: sku.clone(),
                    user_id: user.clone(),
                    quantity,
                    amount_cents: *amount_cents,
                    sale_id: sale_id.clone(),
                    expires_at_ms: *expires_at_ms,
                };
                let payload = messages::encode(&reservation);
                let key = id.to_string();
                retry::durable_until("publish reservation", shutdown, self.deadline(), || {
                    self.producer.send(
                        &self.reservation_topic,
                        &key,
                        &payload,
                        kafka::trace_headers(id),
                        self.produce_timeout,
                    )
                })
                .await?;
                (PurchaseState::Reserved, None)
            }
            ReserveOutcome::Rejected { reason } => (PurchaseState::Rejected, Some(reason.as_str())),
            ReserveOutcome::Waiting => (PurchaseState::Waiting, None),
            // Its buyer was told it failed: there is nobody to tell.
            ReserveOutcome::Voided => return Ok(()),
        };
        let subject = Subject {
            id,
            sku,
            user,
            quantity,
        };
        self.post(&subject, state, reason, shutdown).await
    }

    /// Posts a purchase's state once its effect is durable, retrying until
    /// the board takes it, its deadline, or shutdown.
    pub async fn post(
        &self,
        subject: &Subject<'_>,
        state: PurchaseState,
        reason: Option<&str>,
        shutdown: &CancellationToken,
    ) -> Result<(), Stop> {
        retry::durable_until("post status", shutdown, self.deadline(), || {
            self.board.post(subject, state, reason, clock::now_ms())
        })
        .await
        .map(|_| ())
    }

    /// Tells every waiter in `line` (at once), then acknowledges them.
    pub async fn announce(
        &self,
        sku: &Sku,
        line: &[Announcement],
        shutdown: &CancellationToken,
    ) -> Result<(), Stop> {
        if line.is_empty() {
            return Ok(());
        }
        futures::future::try_join_all(line.iter().map(|waiter| {
            self.tell(
                sku,
                waiter.id,
                &waiter.user,
                waiter.quantity,
                &waiter.outcome,
                shutdown,
            )
        }))
        .await?;
        let ids: Vec<RequestId> = line.iter().map(|waiter| waiter.id).collect();
        retry::durable_until("acknowledge the line", shutdown, self.deadline(), || {
            self.stock.ack(sku, &ids)
        })
        .await
    }
}
