//! The `orders` table: one item per purchase that got a reservation, keyed
//! by the request id, moved through its states only by conditional writes
//! on the current status, so a redelivered or raced message cannot skip or
//! repeat a step.

use std::fmt;
use std::str::FromStr;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{AttributeValue, TransactWriteItem, Update};

use crate::dynamo::{DynamoError, Item, Tables, n, s};
use crate::ids::{Quantity, RequestId, Sku, UserId};
use crate::payment::Charge;
use crate::status::{PurchaseState, PurchaseStatus};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OrderStatus {
    /// Put before the charge; the reservation in Redis holds the units.
    Pending,
    Confirmed,
    Cancelled,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Confirmed => "CONFIRMED",
            Self::Cancelled => "CANCELLED",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Confirmed | Self::Cancelled)
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OrderStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::Pending, Self::Confirmed, Self::Cancelled]
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| format!("unknown order status {s:?}"))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Order {
    pub order_id: RequestId,
    pub sku: Sku,
    pub sale_id: String,
    pub user_id: UserId,
    pub quantity: Quantity,
    pub amount_cents: u64,
    pub status: OrderStatus,
    pub reason: Option<String>,
    pub payment_id: Option<String>,
    /// The reservation's deadline: past it, Redis refuses the commit.
    pub expires_at_ms: u64,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// When each later state was reached (`None`: not, or before these
    /// were recorded).
    pub paid_at_ms: Option<u64>,
    pub confirmed_at_ms: Option<u64>,
    pub cancelled_at_ms: Option<u64>,
}

impl Order {
    /// Whether this order is the purchase `reservation` describes (and not
    /// an earlier one under the same request id: a reused key).
    pub fn is_of(&self, reservation: &crate::bus::messages::Reservation) -> bool {
        self.sku == reservation.sku
            && self.sale_id == reservation.sale_id
            && self.quantity == reservation.quantity
    }

    /// The `PENDING` order a reservation becomes when the order stage
    /// takes it, at `now_ms`.
    pub fn pending(reservation: &crate::bus::messages::Reservation, now_ms: u64) -> Self {
        Self {
            order_id: reservation.request_id,
            sku: reservation.sku.clone(),
            sale_id: reservation.sale_id.clone(),
            user_id: reservation.user_id.clone(),
            quantity: reservation.quantity,
            amount_cents: reservation.amount_cents,
            status: OrderStatus::Pending,
            reason: None,
            payment_id: None,
            expires_at_ms: reservation.expires_at_ms,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            paid_at_ms: None,
            confirmed_at_ms: None,
            cancelled_at_ms: None,
        }
    }

    /// The purchase as a buyer sees it, from the order record: what the
    /// gateway answers once the status board in Redis has forgotten it.
    pub fn purchase_status(&self) -> PurchaseStatus {
        PurchaseStatus {
            request_id: self.order_id.to_string(),
            sku: self.sku.to_string(),
            user_id: self.user_id.to_string(),
            quantity: self.quantity.get(),
            status: match self.status {
                // A PENDING order holds a reservation and waits for its charge.
                OrderStatus::Pending => PurchaseState::Reserved,
                OrderStatus::Confirmed => PurchaseState::Confirmed,
                OrderStatus::Cancelled => PurchaseState::Cancelled,
            },
            reason: self.reason.clone(),
            updated_at_ms: self.updated_at_ms,
            record: None,
            queue_position: None,
            units_may_return: None,
            wait_at_most_s: None,
            waiting_since_ms: None,
        }
    }
}

/// What a conditional write found.
#[derive(Debug, Clone, PartialEq)]
pub enum Written {
    /// The write happened; the order is now as returned.
    Done(Order),
    /// The order was not in the expected state; this is how it stands.
    Conflict(Order),
}

#[derive(Debug, Clone)]
pub struct OrderStore {
    client: Client,
    tables: Tables,
}

impl OrderStore {
    pub fn new(client: Client, tables: &Tables) -> Self {
        Self {
            client,
            tables: tables.clone(),
        }
    }

    /// Puts a new `PENDING` order unless one with this id exists.
    pub async fn create(&self, order: &Order) -> Result<Written, DynamoError> {
        let result = self
            .client
            .put_item()
            .table_name(&self.tables.orders)
            .set_item(Some(to_item(order)))
            .condition_expression("attribute_not_exists(order_id)")
            .send()
            .await;
        match result {
            Ok(_) => Ok(Written::Done(order.clone())),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                self.conflict(order.order_id).await
            }
            Err(e) => Err(DynamoError::from_sdk(e)),
        }
    }

    /// `PENDING` → `CANCELLED` with its reason, and the charge when one
    /// was made (declined, or refunded).
    pub async fn cancel(
        &self,
        id: RequestId,
        reason: &str,
        payment_id: Option<&str>,
        now_ms: u64,
    ) -> Result<Written, DynamoError> {
        let mut update = String::from(
            "SET #st = :to, reason = :reason, updated_at_ms = :now, cancelled_at_ms = :now",
        );
        let mut request = self
            .client
            .update_item()
            .table_name(&self.tables.orders)
            .key("order_id", s(id.to_string()))
            .condition_expression("#st = :from")
            .expression_attribute_names("#st", "status")
            .expression_attribute_values(":from", s(OrderStatus::Pending.as_str()))
            .expression_attribute_values(":to", s(OrderStatus::Cancelled.as_str()))
            .expression_attribute_values(":reason", s(reason))
            .expression_attribute_values(":now", n(now_ms));
        if let Some(payment) = payment_id {
            update.push_str(", payment_id = :payment");
            request = request.expression_attribute_values(":payment", s(payment));
        }
        let result = request
            .update_expression(update)
            .return_values(aws_sdk_dynamodb::types::ReturnValue::AllNew)
            .send()
            .await;
        match result {
            Ok(out) => match out.attributes() {
                Some(attrs) => Ok(Written::Done(from_item(attrs)?)),
                None => self.conflict(id).await,
            },
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                self.conflict(id).await
            }
            Err(e) => Err(DynamoError::from_sdk(e)),
        }
    }

    /// `PENDING` → `CONFIRMED` with its charge, and `inventory.sold +=
    /// quantity`, in one transaction.
    ///
    /// The client request token covers every value written, the time
    /// included, so a retry of this very call (after a timeout that hid a
    /// success) is recognised within DynamoDB's ten-minute window, while
    /// another delivery of the same reservation confirming at another
    /// instant sends another token and is refused by the status condition
    /// instead of by `IdempotentParameterMismatch`.
    pub async fn confirm(
        &self,
        order: &Order,
        charge: &Charge,
        now_ms: u64,
    ) -> Result<Written, DynamoError> {
        let id = order.order_id.to_string();
        let confirm_order = Update::builder()
            .table_name(&self.tables.orders)
            .key("order_id", s(&id))
            .update_expression(
                "SET #st = :to, payment_id = :payment, paid_at_ms = :paid, \
                 updated_at_ms = :now, confirmed_at_ms = :now",
            )
            .condition_expression("#st = :from")
            .expression_attribute_names("#st", "status")
            .expression_attribute_values(":from", s(OrderStatus::Pending.as_str()))
            .expression_attribute_values(":to", s(OrderStatus::Confirmed.as_str()))
            .expression_attribute_values(":payment", s(&charge.id))
            .expression_attribute_values(":paid", n(charge.created_at_ms))
            .expression_attribute_values(":now", n(now_ms))
            .build()?;
        let count_sold = Update::builder()
            .table_name(&self.tables.inventory)
            .key("sku", s(order.sku.as_str()))
            .update_expression("ADD sold :q")
            .condition_expression("sale_id = :sale")
            .expression_attribute_values(":q", n(u64::from(order.quantity.get())))
            .expression_attribute_values(":sale", s(&order.sale_id))
            .build()?;
        let result = self
            .client
            .transact_write_items()
            .client_request_token(confirm_token(order, charge, now_ms))
            .transact_items(TransactWriteItem::builder().update(confirm_order).build())
            .transact_items(TransactWriteItem::builder().update(count_sold).build())
            .send()
            .await;
        match result {
            Ok(_) => Ok(Written::Done(Order {
                status: OrderStatus::Confirmed,
                payment_id: Some(charge.id.clone()),
                paid_at_ms: Some(charge.created_at_ms),
                updated_at_ms: now_ms,
                confirmed_at_ms: Some(now_ms),
                ..order.clone()
            })),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_transaction_canceled_exception()) =>
            {
                // Which condition failed (the order's status, or the sale
                // on the inventory item) is what an operator needs to know.
                if let Some(TransactWriteItemsError::TransactionCanceledException(cancelled)) =
                    e.as_service_error()
                {
                    let reasons: Vec<&str> = cancelled
                        .cancellation_reasons()
                        .iter()
                        .map(|r| r.code().unwrap_or("?"))
                        .collect();
                    tracing::warn!(?reasons, "confirm transaction cancelled");
                }
                self.conflict(order.order_id).await
            }
            Err(e) => Err(DynamoError::from_sdk(e)),
        }
    }

    pub async fn get(&self, id: RequestId) -> Result<Option<Order>, DynamoError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.tables.orders)
            .key("order_id", s(id.to_string()))
            .consistent_read(true)
            .send()
            .await
            .map_err(DynamoError::from_sdk)?;
        out.item().map(from_item).transpose()
    }

    /// Every order of one sale (a scan: for audits, not for the hot path).
    pub async fn of_sale(&self, sku: &Sku, sale_id: &str) -> Result<Vec<Order>, DynamoError> {
        let mut orders = Vec::new();
        let mut start: Option<std::collections::HashMap<String, AttributeValue>> = None;
        loop {
            let out = self
                .client
                .scan()
                .table_name(&self.tables.orders)
                .filter_expression("sku = :sku AND sale_id = :sale")
                .expression_attribute_values(":sku", s(sku.as_str()))
                .expression_attribute_values(":sale", s(sale_id))
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(DynamoError::from_sdk)?;
            for item in out.items() {
                orders.push(from_item(item)?);
            }
            match out.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => return Ok(orders),
            }
        }
    }

    async fn conflict(&self, id: RequestId) -> Result<Written, DynamoError> {
        match self.get(id).await? {
            Some(current) => Ok(Written::Conflict(current)),
            None => Err(DynamoError::Malformed {
                key: id.to_string(),
                problem: "a conditional write failed but the order does not exist".into(),
            }),
        }
    }
}

/// The confirm transaction's client request token: one per order of one
/// sale. DynamoDB keeps tokens account-wide for ten minutes, and the same
/// `(user, Idempotency-Key)` names the same request id in every sale, so
/// the request id alone could collide with another sale's confirmation.
fn confirm_token(order: &Order, charge: &Charge, now_ms: u64) -> String {
    const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6f1d_52c4_8a0e_4c8b_9a57_0e3f_4b6c_2d19);
    let name = format!(
        "{}/{}/{}/{}/{}/{now_ms}",
        order.order_id, order.sku, order.sale_id, charge.id, charge.created_at_ms
    );
    uuid::Uuid::new_v5(&NAMESPACE, name.as_bytes()).to_string()
}

fn to_item(order: &Order) -> std::collections::HashMap<String, AttributeValue> {
    let mut item = std::collections::HashMap::from([
        ("order_id".to_owned(), s(order.order_id.to_string())),
        ("sku".to_owned(), s(order.sku.as_str())),
        ("sale_id".to_owned(), s(&order.sale_id)),
        ("user_id".to_owned(), s(order.user_id.as_str())),
        ("quantity".to_owned(), n(u64::from(order.quantity.get()))),
        ("amount_cents".to_owned(), n(order.amount_cents)),
        ("status".to_owned(), s(order.status.as_str())),
        ("expires_at_ms".to_owned(), n(order.expires_at_ms)),
        ("created_at_ms".to_owned(), n(order.created_at_ms)),
        ("updated_at_ms".to_owned(), n(order.updated_at_ms)),
    ]);
    if let Some(reason) = &order.reason {
        item.insert("reason".into(), s(reason));
    }
    if let Some(payment) = &order.payment_id {
        item.insert("payment_id".into(), s(payment));
    }
    let steps = [
        ("paid_at_ms", order.paid_at_ms),
        ("confirmed_at_ms", order.confirmed_at_ms),
        ("cancelled_at_ms", order.cancelled_at_ms),
    ];
    for (name, at) in steps {
        if let Some(at) = at {
            item.insert(name.into(), n(at));
        }
    }
    item
}

fn from_item(
    attrs: &std::collections::HashMap<String, AttributeValue>,
) -> Result<Order, DynamoError> {
    let key = attrs
        .get("order_id")
        .and_then(|v| v.as_s().ok())
        .map(String::as_str)
        .unwrap_or("?");
    let item = Item { key, attrs };
    let malformed = |problem: String| DynamoError::Malformed {
        key: key.to_owned(),
        problem,
    };
    Ok(Order {
        order_id: RequestId::parse(key).map_err(|e| malformed(e.to_string()))?,
        sku: Sku::parse(&item.string("sku")?).map_err(|e| malformed(e.to_string()))?,
        sale_id: item.string("sale_id")?,
        user_id: UserId::parse(&item.string("user_id")?).map_err(|e| malformed(e.to_string()))?,
        quantity: Quantity::new(item.number("quantity")? as i64)
            .map_err(|e| malformed(e.to_string()))?,
        amount_cents: item.number("amount_cents")?,
        status: item.string("status")?.parse().map_err(malformed)?,
        reason: item.optional_string("reason"),
        payment_id: item.optional_string("payment_id"),
        expires_at_ms: item.number("expires_at_ms")?,
        created_at_ms: item.number("created_at_ms")?,
        updated_at_ms: item.number("updated_at_ms")?,
        paid_at_ms: item.optional_number("paid_at_ms"),
        confirmed_at_ms: item.optional_number("confirmed_at_ms"),
        cancelled_at_ms: item.optional_number("cancelled_at_ms"),
    })
}
