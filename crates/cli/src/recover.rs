//! Rebuilding a sku in Redis after Redis was lost.
//!
//! What Redis held is derived again from what outlives it:
//!
//! * DynamoDB `inventory`: the sale's rules, its total, and `sold`;
//! * DynamoDB `orders` of the sale: `CONFIRMED` orders hold sold units,
//!   `CANCELLED` ones gave theirs back, and a `PENDING` one holds reserved
//!   units unless the payment service holds a kept charge for it, made
//!   before its deadline: then its saga may have committed in the lost
//!   Redis and be about to confirm, so its units are counted sold (its
//!   commit is then a no-op);
//! * the `reservations` topic from the order-workers' committed offsets
//!   on: reservations the order stage has not written to DynamoDB yet,
//!   reserved.
//!
//! A reservation past its deadline that is not known to be sold (no kept
//! charge made in time) is restored as given back, `reservation_expired`:
//! the lost Redis's sweep had given it back or was about to, and its unit
//! may have been sold again since (counting it held read as oversold).
//! Its saga, when it comes, finds it released and refunds or cancels.
//!
//! Every recovered reservation also gets back its processed marker, so a
//! purchase request redelivered after the loss is answered as before and
//! never reserved twice. Until the stock hash is written (last), every
//! script answers `unloaded` and the workers wait: nothing moves a unit of
//! a sku while it is being recovered.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::message::Message;
use serde::Serialize;

use flashsale_core::bus::kafka::{self, KafkaFailure, topic};
use flashsale_core::bus::messages::{self, Reservation};
use flashsale_core::bus::topic_reader::{self, PartitionRange};
use flashsale_core::dynamo::DynamoError;
use flashsale_core::dynamo::inventory::{InventoryStore, Sale};
use flashsale_core::dynamo::orders::{Order, OrderStatus, OrderStore};
use flashsale_core::ids::{RequestId, Sku};
use flashsale_core::payment::{ChargeStatus, PaymentClient, PaymentError};
use flashsale_core::service::settings::KafkaSettings;
use flashsale_core::stock::{
    RestoredReservation, RestoredState, StockError, StockLevels, StockStore,
};

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("{0} has no sale in DynamoDB: nothing to recover")]
    NoSale(Sku),
    #[error(
        "Redis still holds stock for {0}; recovering would overwrite it (pass --force if Redis is known to be wrong)"
    )]
    StillLoaded(Sku),
    #[error(
        "orders and inventory of {sku} kept changing under the recovery ({detail}); run it again"
    )]
    Unsettled { sku: Sku, detail: String },
    #[error(
        "workers still consume while {sku} would be rebuilt under them: {}; stop them (or scale \
         both groups to zero) and run it again",
        members.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    )]
    LiveMembers {
        sku: Sku,
        members: Vec<flashsale_core::bus::members::Member>,
    },
    #[error("{sku}: {reserved} reserved and {sold} sold exceed the total of {total}")]
    Oversold {
        sku: Sku,
        total: u64,
        reserved: i64,
        sold: i64,
    },
    #[error(transparent)]
    Dynamo(#[from] DynamoError),
    #[error(transparent)]
    Kafka(#[from] KafkaFailure),
    #[error(transparent)]
    Redis(#[from] StockError),
    #[error("looking up the charge of pending order {order}: {error}")]
    Payment {
        order: RequestId,
        error: PaymentError,
    },
}

/// What a recovery wrote back.
#[derive(Debug, Clone, Serialize)]
pub struct Recovered {
    pub sku: String,
    pub levels: StockLevels,
    /// Reservations rebuilt from orders in DynamoDB.
    pub from_orders: usize,
    /// Reservations rebuilt from the `reservations` topic (no order yet).
    pub from_topic: usize,
}

#[derive(Debug)]
pub struct Sources<'a> {
    pub stock: &'a StockStore,
    pub inventory: &'a InventoryStore,
    pub orders: &'a OrderStore,
    pub payment: &'a PaymentClient,
    pub kafka: &'a KafkaSettings,
}

/// Rebuilds `sku`. Refuses when Redis still holds the sku, unless `force`
/// (which unloads it first, pausing its workers until the end).
pub async fn recover(
    sources: &Sources<'_>,
    sku: &Sku,
    force: bool,
) -> Result<Recovered, RecoveryError> {
    if sources.stock.status(sku, 0).await?.is_some() {
        if !force {
            return Err(RecoveryError::StillLoaded(sku.clone()));
        }
        // The sku is live: a worker reserving or committing beside the
        // rebuild would be counted by neither, and could oversell.
        let mut members = Vec::new();
        for group in [kafka::group::SHOP, kafka::group::ORDERS] {
            let group = sources.kafka.group(group);
            members.extend(
                flashsale_core::bus::members::live(sources.stock.connection(), &group)
                    .await
                    .map_err(StockError::from)?,
            );
        }
        if !members.is_empty() {
            return Err(RecoveryError::LiveMembers {
                sku: sku.clone(),
                members,
            });
        }
        sources.stock.unload(sku).await?;
    }
    let (sale, orders) = settled_snapshot(sources, sku).await?;
    let known: HashMap<RequestId, &Order> = orders.iter().map(|o| (o.order_id, o)).collect();
    let now = flashsale_core::clock::now_ms();
    let mut restored = Vec::with_capacity(orders.len());
    for order in &orders {
        restored.push(from_order(order, paid(sources.payment, order).await?, now));
    }
    let from_orders = restored.len();

    let pending = unprocessed_reservations(sources.kafka).await?;
    let mut seen = std::collections::HashSet::new();
    for reservation in pending {
        let fresh = reservation.sku == *sku
            && reservation.sale_id == sale.rules.sale_id
            && !known.contains_key(&reservation.request_id)
            && seen.insert(reservation.request_id);
        if fresh {
            let state = held_unless_expired(reservation.expires_at_ms, now);
            restored.push(RestoredReservation {
                id: reservation.request_id,
                user: reservation.user_id,
                quantity: reservation.quantity,
                amount_cents: reservation.amount_cents,
                expires_at_ms: reservation.expires_at_ms,
                state,
            });
        }
    }
    let from_topic = restored.len() - from_orders;

    let units = |wanted: fn(&RestoredState) -> bool| -> i64 {
        restored
            .iter()
            .filter(|r| wanted(&r.state))
            .map(|r| i64::from(r.quantity.get()))
            .sum()
    };
    let reserved = units(|s| *s == RestoredState::Reserved);
    let sold = units(|s| *s == RestoredState::Committed);
    if reserved + sold > sale.rules.total as i64 {
        return Err(RecoveryError::Oversold {
            sku: sku.clone(),
            total: sale.rules.total,
            reserved,
            sold,
        });
    }
    let levels = sources
        .stock
        .restore(sku, &sale.rules, sale.closed, &restored)
        .await?;
    tracing::info!(%sku, ?levels, from_orders, from_topic, "recovered");
    Ok(Recovered {
        sku: sku.to_string(),
        levels,
        from_orders,
        from_topic,
    })
}

/// How a `PENDING` order was paid: `Some(created at)` of a kept charge (its
/// saga is past the charge, and may be past the Redis commit).
async fn paid(payment: &PaymentClient, order: &Order) -> Result<Option<u64>, RecoveryError> {
    if order.status != OrderStatus::Pending {
        return Ok(None);
    }
    let charge =
        payment
            .find_charge(order.order_id)
            .await
            .map_err(|error| RecoveryError::Payment {
                order: order.order_id,
                error,
            })?;
    Ok(charge
        .filter(|c| c.status == ChargeStatus::Succeeded && !c.refunded)
        .map(|c| c.created_at_ms))
}

/// A reservation not known to be sold: held until its deadline, given back
/// after it.
fn held_unless_expired(expires_at_ms: u64, now_ms: u64) -> RestoredState {
    if now_ms > expires_at_ms {
        RestoredState::Released {
            reason: flashsale_core::status::reason::RESERVATION_EXPIRED.to_owned(),
        }
    } else {
        RestoredState::Reserved
    }
}

fn from_order(order: &Order, paid_at_ms: Option<u64>, now_ms: u64) -> RestoredReservation {
    RestoredReservation {
        id: order.order_id,
        user: order.user_id.clone(),
        quantity: order.quantity,
        amount_cents: order.amount_cents,
        expires_at_ms: order.expires_at_ms,
        state: match order.status {
            // Paid in time: its saga may have committed before the loss, so
            // it is sold; it commits (now a no-op) and confirms, whatever
            // the deadline did during the outage. Paid after the deadline,
            // its commit was refused: like an unpaid one.
            OrderStatus::Pending => match paid_at_ms {
                Some(at) if at <= order.expires_at_ms => RestoredState::Committed,
                _ => held_unless_expired(order.expires_at_ms, now_ms),
            },
            OrderStatus::Confirmed => RestoredState::Committed,
            OrderStatus::Cancelled => RestoredState::Released {
                reason: order.reason.clone().unwrap_or_default(),
            },
        },
    }
}

/// Orders of the sale and the inventory item, read so they agree: the
/// inventory's `sold` must lie between the confirmed units and the
/// confirmed-or-pending units of the orders read just before it. A confirm
/// landing between the two reads only moves it within that range; outside
/// it the sale changed under the reads: read again.
async fn settled_snapshot(
    sources: &Sources<'_>,
    sku: &Sku,
) -> Result<(Sale, Vec<Order>), RecoveryError> {
    let mut detail = String::new();
    for _ in 0..5 {
        let Some(before) = sources.inventory.get(sku).await? else {
            return Err(RecoveryError::NoSale(sku.clone()));
        };
        let orders = sources.orders.of_sale(sku, &before.rules.sale_id).await?;
        let Some(sale) = sources.inventory.get(sku).await? else {
            return Err(RecoveryError::NoSale(sku.clone()));
        };
        let units = |statuses: &[OrderStatus]| -> u64 {
            orders
                .iter()
                .filter(|o| statuses.contains(&o.status))
                .map(|o| u64::from(o.quantity.get()))
                .sum()
        };
        let confirmed = units(&[OrderStatus::Confirmed]);
        let pending_or_confirmed = units(&[OrderStatus::Confirmed, OrderStatus::Pending]);
        if sale.rules.sale_id == before.rules.sale_id
            && (confirmed..=pending_or_confirmed).contains(&sale.sold)
        {
            return Ok((sale, orders));
        }
        detail = format!(
            "inventory sold {} but orders hold {confirmed} confirmed, {pending_or_confirmed} pending or confirmed",
            sale.sold
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(RecoveryError::Unsettled {
        sku: sku.clone(),
        detail,
    })
}

/// Reservations past the order-workers' committed offsets: everything
/// before them has an order in DynamoDB already.
async fn unprocessed_reservations(
    settings: &KafkaSettings,
) -> Result<Vec<Reservation>, RecoveryError> {
    let topic_name = settings.topic(topic::RESERVATIONS);
    let group = settings.group(kafka::group::ORDERS);
    let committed: HashMap<i32, Option<i64>> =
        topic_reader::committed(settings, &group, &topic_name)
            .await?
            .into_iter()
            .collect();
    let ranges: Vec<PartitionRange> = topic_reader::watermarks(settings, &topic_name)
        .await?
        .into_iter()
        .map(|r| PartitionRange {
            low: committed
                .get(&r.partition)
                .copied()
                .flatten()
                .unwrap_or(r.low)
                .max(r.low),
            ..r
        })
        .collect();
    let records =
        topic_reader::read(settings, &topic_name, ranges, Duration::from_secs(120)).await?;
    Ok(records
        .iter()
        // Unreadable records went to the DLQ in the order stage: no order.
        .filter_map(|m| messages::decode::<Reservation>(m.payload()).ok())
        .collect())
}

/// The skus that have a sale in DynamoDB and no stock in Redis: what a
/// recovery without `--sku` rebuilds.
pub async fn lost_skus(stores: &crate::Stores) -> Result<Vec<Sku>, RecoveryError> {
    let mut lost = Vec::new();
    for sku in stores.inventory.skus().await? {
        if stores.stock.status(&sku, 0).await?.is_none() {
            lost.push(sku);
        }
    }
    Ok(lost)
}
