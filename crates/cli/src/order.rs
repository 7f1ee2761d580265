//! One purchase as every store sees it, for `flashsale order show`: the
//! order record (status, reason, payment id, when each step happened), the
//! charge the payment service holds under the order's idempotency key, and
//! what the buyer is shown.

use flashsale_core::dynamo::orders::Order;
use flashsale_core::ids::RequestId;
use flashsale_core::payment::Charge;
use flashsale_core::status::PurchaseStatus;
use serde::Serialize;

use crate::Stores;

#[derive(Debug, Serialize)]
pub struct OrderView {
    pub order_id: String,
    /// `None` when the purchase never got a reservation (rejected), or is
    /// still queued.
    pub order: Option<OrderRecord>,
    /// The charge made under the order id, if any.
    pub charge: Option<Charge>,
    /// What `GET /v1/purchases/{id}` answers (the status board).
    pub buyer_sees: Option<PurchaseStatus>,
}

#[derive(Debug, Serialize)]
pub struct OrderRecord {
    pub sku: String,
    pub sale_id: String,
    pub user_id: String,
    pub quantity: u32,
    pub amount_cents: u64,
    pub status: String,
    pub reason: Option<String>,
    pub payment_id: Option<String>,
    pub created_at_ms: u64,
    pub paid_at_ms: Option<u64>,
    pub confirmed_at_ms: Option<u64>,
    pub cancelled_at_ms: Option<u64>,
    pub reservation_expires_at_ms: u64,
}

impl From<Order> for OrderRecord {
    fn from(o: Order) -> Self {
        Self {
            sku: o.sku.to_string(),
            sale_id: o.sale_id,
            user_id: o.user_id.to_string(),
            quantity: o.quantity.get(),
            amount_cents: o.amount_cents,
            status: o.status.to_string(),
            reason: o.reason,
            payment_id: o.payment_id,
            created_at_ms: o.created_at_ms,
            paid_at_ms: o.paid_at_ms,
            confirmed_at_ms: o.confirmed_at_ms,
            cancelled_at_ms: o.cancelled_at_ms,
            reservation_expires_at_ms: o.expires_at_ms,
        }
    }
}

/// `None` when no store knows the id.
pub async fn show(stores: &Stores, id: RequestId) -> anyhow::Result<Option<OrderView>> {
    let order = stores.orders.get(id).await?;
    let charge = stores.payment.find_charge(id).await?;
    let buyer_sees = stores.board.get(id).await?;
    if order.is_none() && charge.is_none() && buyer_sees.is_none() {
        return Ok(None);
    }
    Ok(Some(OrderView {
        order_id: id.to_string(),
        order: order.map(OrderRecord::from),
        charge,
        buyer_sees,
    }))
}
