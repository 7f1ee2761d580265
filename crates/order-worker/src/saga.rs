//! The order saga: reservation in, confirmed or cancelled order out.
//!
//! Each pass looks at the order's stored status and takes what follows it,
//! so a worker that died anywhere resumes where the record says it stopped
//! when the reservation is redelivered:
//!
//! ```text
//! (none) ── put ──▶ PENDING ── charge ok ── Redis commit ── transaction ──▶ CONFIRMED (+ inventory.sold)
//!                      │ declined / refused    │ reservation expired: refund
//!                      ▼                       ▼
//!                  CANCELLED ◀─────────────────┘ ── stock release ──▶ units back,
//!                                                     then the shop-worker posts `cancelled`
//! ```
//!
//! A paid order is not written down between the charge and the confirm:
//! a redelivered `PENDING` order charges again with the same idempotency
//! key, and the processor answers with the charge it already made (past
//! the deadline only the lookup is sent), after which the commit and the
//! transaction are repeated as well. That spares DynamoDB, the stage's
//! bottleneck, one write per order.
//!
//! Every step is idempotent by the request id: the conditional writes, the
//! payment's idempotency key, the Lua commit, withdrawal and release.
//!
//! Two runs of one purchase may overlap (a partition taken over from a
//! worker that was only slow), and their clocks may disagree about the
//! deadline. Redis decides: an order is confirmed only after the commit
//! script sold its units, and cancelled only after the withdrawal script
//! settled them as unsold; whichever of the two comes first, the other
//! then fails, and its run follows the winner (a run that finds its units
//! sold confirms with the charge, which its idempotency key makes the
//! same; a paid run that finds them withdrawn refunds). A cancelled order
//! without a charge of its own looks one up and refunds it: the other run
//! may have been answered after this one looked.

use std::sync::Arc;

use flashsale_core::bus::consumer::Abandoned;
use flashsale_core::bus::kafka;
use flashsale_core::bus::messages::{self, Reservation, SCHEMA_VERSION, StockRelease};
use flashsale_core::dynamo::orders::{Order, OrderStatus, Written};
use flashsale_core::ids::{Quantity, RequestId, Sku, UserId};
use flashsale_core::payment::{
    Charge, ChargeMetadata, ChargeOutcome, ChargeRequest, ChargeStatus, PaymentError,
};
use flashsale_core::service::retry;
use flashsale_core::service::retry::{Stop, Transience};
use flashsale_core::status::board::Subject;
use flashsale_core::status::{PurchaseState, reason};
use flashsale_core::stock::{CommitOutcome, WithdrawOutcome};

use crate::Deps;

fn current(written: Written) -> Order {
    match written {
        Written::Done(order) | Written::Conflict(order) => order,
    }
}

pub(crate) async fn run(deps: Arc<Deps>, reservation: Reservation) -> Result<(), Stop> {
    let now = deps.now_ms();
    let id = reservation.request_id;
    let fresh = Order::pending(&reservation, now);
    let put = timed(&deps, "put", async {
        durable(&deps, "put order", || {
            dynamodb(&deps, "put");
            deps.orders.create(&fresh)
        })
        .await
    });
    let mut order = current(put.await?);
    if !order.is_of(&reservation) {
        // The order under this id is another purchase (another sku, sale or
        // quantity): the buyer reused an Idempotency-Key after the first
        // purchase left the status board. Its order is left alone; this
        // one's units go back, and its buyer hears why.
        tracing::warn!(first_sku = %order.sku, "Idempotency-Key reused for another purchase; refused");
        deps.metrics
            .outcomes
            .with_label_values(&["key_reused"])
            .inc();
        return send_release(
            &deps,
            id,
            &reservation.sku,
            &reservation.user_id,
            reservation.quantity,
            reason::IDEMPOTENCY_KEY_REUSED,
        )
        .await;
    }
    crash_point(&deps, CrashPoint::AfterPut);
    // Waits between passes that could not move the order on.
    let mut stalled = retry::Backoff::default();
    let mut stalled_since = None;
    loop {
        tracing::debug!(status = %order.status, "saga step");
        order = match order.status {
            // Past the deadline, no new charge is sent: the saga only
            // finds out whether an earlier attempt made one.
            OrderStatus::Pending => {
                let next = settle_pending(&deps, &order).await?;
                if next.status == OrderStatus::Pending {
                    // A confirm refused while the order stayed PENDING (its
                    // sale replaced in DynamoDB), or another run of this
                    // purchase not done yet: try again, more and more
                    // slowly, and let an alert see it.
                    deps.metrics.stalls.inc();
                    let since = *stalled_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() > deps.give_up_after {
                        // Parked: a later run finds the order as it is then.
                        return Err(Stop::GaveUp("the order stayed PENDING".into()));
                    }
                    tracing::warn!("the saga could not move the order on; trying again");
                    wait(&deps, &mut stalled).await?;
                }
                next
            }
            OrderStatus::Confirmed => {
                deps.metrics
                    .outcomes
                    .with_label_values(&["confirmed"])
                    .inc();
                return announce(&deps, &order, PurchaseState::Confirmed).await;
            }
            // The shop-worker posts `cancelled` once the units are back.
            OrderStatus::Cancelled => {
                if let Err(stop) = refund_stray_charge(&deps, &order).await {
                    // The processor cannot say whether another run charged:
                    // the units go back now (the sale goes on without them
                    // waiting on the processor), and the parked
                    // reservation looks again later.
                    if matches!(stop, Stop::GaveUp(_)) {
                        release(&deps, &order).await?;
                    }
                    return Err(stop);
                }
                deps.metrics
                    .outcomes
                    .with_label_values(&["cancelled"])
                    .inc();
                return release(&deps, &order).await;
            }
        };
    }
}

/// Charges a `PENDING` order, then confirms it (Redis commit, DynamoDB
/// transaction) or cancels it; returns the order as it is stored then.
async fn settle_pending(deps: &Deps, order: &Order) -> Result<Order, Stop> {
    let request = ChargeRequest {
        amount_cents: order.amount_cents,
        currency: deps.currency.clone(),
        metadata: ChargeMetadata {
            order_id: order.order_id.to_string(),
            sku: order.sku.to_string(),
            sale_id: order.sale_id.clone(),
        },
    };
    let outcome = timed(deps, "charge", settle_charge(deps, order, &request)).await?;
    crash_point(deps, CrashPoint::AfterCharge);
    let (why, payment_id) = match &outcome {
        Charged::Done(ChargeOutcome::Succeeded(charge)) => {
            announce(deps, order, PurchaseState::Paid).await?;
            return commit(deps, order, charge).await;
        }
        Charged::Done(ChargeOutcome::Declined(charge)) => {
            (reason::PAYMENT_DECLINED, Some(charge.id.as_str()))
        }
        Charged::Refused(detail) => {
            tracing::warn!(%detail, "payment refused the charge");
            (reason::PAYMENT_FAILED, None)
        }
        Charged::NeverMade => (reason::RESERVATION_EXPIRED, None),
        Charged::Unknown => (reason::PAYMENT_UNAVAILABLE, None),
    };
    if !withdraw(deps, order, why).await? {
        // Another run of this purchase was paid and sold its units (its
        // charge answered, ours was refused or not seen yet): this order
        // is to be confirmed. Wait for that run (the caller backs off on a
        // PENDING order), or take its place.
        return reread(deps, order).await;
    }
    cancel(deps, order, why, payment_id).await
}

/// How the charge of an order ended.
enum Charged {
    Done(ChargeOutcome),
    Refused(String),
    /// The reservation expired before any attempt was answered, and the
    /// processor confirms it never made the charge.
    NeverMade,
    /// The processor answered nothing, charges nor lookups, until the
    /// reservation's deadline and `FLASHSALE_RETRY_DEADLINE_MS` after it:
    /// the purchase is cancelled, and a charge it may have made is looked
    /// up (and refunded) by later runs (`refund_stray_charge`).
    Unknown,
}

/// Charges with the order id as idempotency key until the processor has
/// answered. A failure without an answer (a timeout, a `5xx`) may still
/// have charged, so before each new attempt the charge is looked up by its
/// key. Attempts go through the breaker and back off with jitter. Once the
/// reservation has expired no new charge is sent: only the lookup, until
/// it tells whether there is a charge (to be refunded) or none.
async fn settle_charge(
    deps: &Deps,
    order: &Order,
    request: &ChargeRequest,
) -> Result<Charged, Stop> {
    let mut backoff = retry::Backoff::default();
    let mut unanswered = false;
    let mut failed = false;
    let give_up_at_ms = order
        .expires_at_ms
        .saturating_add(deps.give_up_after.as_millis() as u64);
    loop {
        // Only a processor that failed to answer is given up on: one that
        // answers decides.
        if failed && deps.now_ms() > give_up_at_ms {
            count(deps, "given_up");
            tracing::error!(
                "the processor answered nothing past the reservation's deadline; cancelling"
            );
            return Ok(Charged::Unknown);
        }
        deps.breaker.admit(&deps.shutdown).await?;
        let expired = deps.now_ms() > order.expires_at_ms;
        if unanswered || expired {
            match deps.payment.find_charge(order.order_id).await {
                Ok(Some(charge)) => {
                    deps.breaker.record(true);
                    count(deps, "found_by_key");
                    return Ok(Charged::Done(match charge.status {
                        ChargeStatus::Succeeded => ChargeOutcome::Succeeded(charge),
                        ChargeStatus::Declined => ChargeOutcome::Declined(charge),
                    }));
                }
                Ok(None) if expired => {
                    deps.breaker.record(true);
                    count(deps, "expired_uncharged");
                    return Ok(Charged::NeverMade);
                }
                Ok(None) => deps.breaker.record(true),
                Err(error) => {
                    deps.breaker.record(false);
                    count(deps, "lookup_failed");
                    tracing::warn!(%error, "charge lookup failed; retrying");
                    failed = true;
                    wait(deps, &mut backoff).await?;
                    continue;
                }
            }
        }
        match deps.payment.charge(order.order_id, request).await {
            Ok(outcome) => {
                deps.breaker.record(true);
                count(
                    deps,
                    match outcome {
                        ChargeOutcome::Succeeded(_) => "succeeded",
                        ChargeOutcome::Declined(_) => "declined",
                    },
                );
                return Ok(Charged::Done(outcome));
            }
            Err(PaymentError::Refused(detail)) => {
                deps.breaker.record(true);
                count(deps, "refused");
                return Ok(Charged::Refused(detail));
            }
            Err(PaymentError::Transient(error)) => {
                deps.breaker.record(false);
                count(deps, "unanswered");
                tracing::warn!(%error, "charge unanswered; looking it up before trying again");
                unanswered = true;
                failed = true;
                wait(deps, &mut backoff).await?;
            }
        }
    }
}

/// Retries a store call (or the processor) until it succeeds, for at most
/// `FLASHSALE_RETRY_DEADLINE_MS`: past it the run stops, and the handler
/// parks the reservation at the tail of its topic, from where a later run
/// resumes the purchase where the stores say it stopped.
async fn durable<T, E, F, Fut>(deps: &Deps, what: &str, attempt: F) -> Result<T, Stop>
where
    E: Transience + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + deps.give_up_after;
    retry::durable_until(what, &deps.shutdown, deadline, attempt).await
}

/// Runs one step, recording how long it took (`order_step_seconds`).
async fn timed<T>(deps: &Deps, step: &str, work: impl std::future::Future<Output = T>) -> T {
    let started = std::time::Instant::now();
    let out = work.await;
    deps.metrics
        .step_seconds
        .with_label_values(&[step])
        .observe(started.elapsed().as_secs_f64());
    out
}

fn dynamodb(deps: &Deps, op: &str) {
    deps.metrics
        .dynamodb_requests
        .with_label_values(&[op])
        .inc();
}

fn count(deps: &Deps, outcome: &str) {
    deps.metrics.charges.with_label_values(&[outcome]).inc();
}

async fn wait(deps: &Deps, backoff: &mut retry::Backoff) -> Result<(), Stop> {
    tokio::select! {
        _ = deps.shutdown.cancelled() => Err(Abandoned("shutting down mid-charge".into()).into()),
        _ = tokio::time::sleep(backoff.next_wait()) => Ok(()),
    }
}

/// Sells the reserved units in Redis, then confirms the order with its
/// charge in DynamoDB; or, when the reservation is gone, refunds.
async fn commit(deps: &Deps, order: &Order, charge: &Charge) -> Result<Order, Stop> {
    let outcome = timed(deps, "commit", async {
        durable(deps, "commit stock", || {
            deps.stock.commit(&order.sku, order.order_id, deps.now_ms())
        })
        .await
    })
    .await?;
    // One unit fewer can come back: the tail of the line that this
    // shortened hears it now rather than at the next sweep.
    deps.herald
        .announce(&order.sku, &outcome.line, &deps.shutdown)
        .await?;
    match outcome.outcome {
        CommitOutcome::Committed => confirm(deps, order, charge).await,
        CommitOutcome::Expired | CommitOutcome::Released { .. } | CommitOutcome::Missing => {
            // Paid for units we no longer hold (the deadline passed, the
            // sweep gave them back, or the record outlived its retention):
            // settle them as unsold first, unless another run of this
            // purchase sold them meanwhile (then it confirms with this very
            // charge); then give the money back, then cancel, so a crash in
            // between repeats the (idempotent) refund rather than leaving a
            // charge.
            tracing::info!(?outcome, "reservation gone after payment; refunding");
            if !withdraw(deps, order, reason::RESERVATION_EXPIRED).await? {
                return confirm(deps, order, charge).await;
            }
            durable(deps, "refund", || deps.payment.refund(&charge.id)).await?;
            cancel(deps, order, reason::RESERVATION_EXPIRED, Some(&charge.id)).await
        }
    }
}

/// Confirms an order whose units are sold, with its charge, in DynamoDB.
async fn confirm(deps: &Deps, order: &Order, charge: &Charge) -> Result<Order, Stop> {
    crash_point(deps, CrashPoint::AfterCommit);
    // Read once: every retry of this delivery must send the same values
    // under the same transaction token.
    let confirmed_at = deps.now_ms();
    let confirmed = timed(deps, "confirm", async {
        durable(deps, "confirm order", || {
            dynamodb(deps, "confirm");
            deps.orders.confirm(order, charge, confirmed_at)
        })
        .await
    });
    Ok(current(confirmed.await?))
}

/// Settles the order's reservation as never to be sold, in Redis, before
/// the order is cancelled: Redis decides between this and a commit, so two
/// runs of one purchase at once (a partition taken over from a worker that
/// was only slow), whatever their clocks, never end with one confirming
/// and the other cancelling. `false` when the units were sold.
async fn withdraw(deps: &Deps, order: &Order, why: &str) -> Result<bool, Stop> {
    let outcome = durable(deps, "withdraw reservation", || {
        deps.stock.withdraw(&order.sku, order.order_id, why)
    })
    .await?;
    tracing::debug!(?outcome, "withdraw");
    Ok(outcome != WithdrawOutcome::WasCommitted)
}

/// The order as DynamoDB holds it now.
async fn reread(deps: &Deps, order: &Order) -> Result<Order, Stop> {
    let stored = durable(deps, "read order", || deps.orders.get(order.order_id)).await?;
    Ok(stored.unwrap_or_else(|| order.clone()))
}

/// A cancelled order records the charge its run made, if any; another run
/// of the same purchase may have had one answered after this run looked
/// (or died before its own refund). Such a charge is refunded here.
async fn refund_stray_charge(deps: &Deps, order: &Order) -> Result<(), Stop> {
    if order.payment_id.is_some() {
        return Ok(());
    }
    let found = durable(deps, "look up a stray charge", || {
        deps.payment.find_charge(order.order_id)
    })
    .await?;
    if let Some(charge) = found
        && charge.status == ChargeStatus::Succeeded
        && !charge.refunded
    {
        tracing::warn!(charge = %charge.id, "a cancelled order's purchase was charged by another run; refunding");
        count(deps, "stray_refunded");
        durable(deps, "refund", || deps.payment.refund(&charge.id)).await?;
    }
    Ok(())
}

/// Where the kill tests make a worker die: right after the order was put,
/// after the processor charged (before the Redis commit), and after the
/// units were committed in Redis (before the DynamoDB transaction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    AfterPut,
    AfterCharge,
    AfterCommit,
}

impl std::str::FromStr for CrashPoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "put" => Ok(Self::AfterPut),
            "charge" => Ok(Self::AfterCharge),
            "commit" => Ok(Self::AfterCommit),
            other => Err(format!("{other:?} is not put, charge or commit")),
        }
    }
}

/// Dies like a SIGKILL (no drain, no commit, no leaving the group) when the
/// worker was started with `FLASHSALE_ORDER_CRASH_AFTER` at this point.
fn crash_point(deps: &Deps, here: CrashPoint) {
    if deps.crash_after == Some(here) {
        tracing::error!(?here, "FLASHSALE_ORDER_CRASH_AFTER: dying here");
        std::process::abort();
    }
}

/// `PENDING` → `CANCELLED`, with the reason and the charge if one was made.
async fn cancel(
    deps: &Deps,
    order: &Order,
    why: &str,
    payment_id: Option<&str>,
) -> Result<Order, Stop> {
    let written = durable(deps, "cancel order", || {
        dynamodb(deps, "cancel");
        deps.orders
            .cancel(order.order_id, why, payment_id, deps.now_ms())
    })
    .await?;
    Ok(current(written))
}

/// Asks the shop-worker to give the units back and then post `cancelled`;
/// its release script acts once, however often this is sent.
async fn release(deps: &Deps, order: &Order) -> Result<(), Stop> {
    send_release(
        deps,
        order.order_id,
        &order.sku,
        &order.user_id,
        order.quantity,
        order.reason.as_deref().unwrap_or_default(),
    )
    .await
}

async fn send_release(
    deps: &Deps,
    id: RequestId,
    sku: &Sku,
    user: &UserId,
    quantity: Quantity,
    why: &str,
) -> Result<(), Stop> {
    let message = StockRelease {
        v: SCHEMA_VERSION,
        request_id: id,
        sku: sku.clone(),
        user_id: user.clone(),
        quantity,
        reason: why.to_owned(),
    };
    let payload = messages::encode(&message);
    durable(deps, "send stock release", || {
        deps.producer.send(
            &deps.release_topic,
            sku.as_str(),
            &payload,
            kafka::trace_headers(id),
            deps.produce_timeout,
        )
    })
    .await
    .map(|_| ())
}

async fn announce(deps: &Deps, order: &Order, state: PurchaseState) -> Result<(), Stop> {
    let subject = Subject {
        id: order.order_id,
        sku: &order.sku,
        user: &order.user_id,
        quantity: order.quantity,
    };
    deps.herald
        .post(&subject, state, order.reason.as_deref(), &deps.shutdown)
        .await
}
