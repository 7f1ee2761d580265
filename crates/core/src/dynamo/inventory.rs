//! The `inventory` table: one item per sku, the source of truth for what a
//! sale is (its total and rules) and for how many units were sold.

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::AttributeValue;

use crate::dynamo::{DynamoError, Item, Tables, n, s};
use crate::ids::Sku;
use crate::stock::SaleRules;

#[derive(Debug, Clone, PartialEq)]
pub struct Sale {
    pub sku: Sku,
    pub rules: SaleRules,
    /// Units whose order is `CONFIRMED`; moved only by the confirm transaction.
    pub sold: u64,
    /// Closed by an operator: no new reservations, whatever the window says.
    pub closed: bool,
}

/// What a restock found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestockWrite {
    Applied,
    /// This operation id was applied before (a retried command).
    AlreadyApplied,
}

#[derive(Debug, Clone)]
pub struct InventoryStore {
    client: Client,
    table: String,
}

impl InventoryStore {
    pub fn new(client: Client, tables: &Tables) -> Self {
        Self {
            client,
            table: tables.inventory.clone(),
        }
    }

    /// Creates the sale, replacing any earlier sale of the sku.
    pub async fn put(&self, sku: &Sku, rules: &SaleRules) -> Result<(), DynamoError> {
        self.client
            .put_item()
            .table_name(&self.table)
            .item("sku", s(sku.as_str()))
            .item("sale_id", s(&rules.sale_id))
            .item("total", n(rules.total))
            .item("sold", n(0))
            .item("per_user_limit", n(rules.per_user_limit))
            .item("price_cents", n(rules.price_cents))
            .item("reservation_ttl_ms", n(rules.reservation_ttl_ms))
            .item("starts_at_ms", n(rules.starts_at_ms))
            .item("ends_at_ms", n(rules.ends_at_ms))
            .item("overbook", AttributeValue::N(rules.overbook.to_string()))
            .item("closed", AttributeValue::Bool(false))
            .send()
            .await
            .map_err(DynamoError::from_sdk)?;
        Ok(())
    }

    /// Adds `units` to the total of sale `sale_id`, once per `operation_id`
    /// (the ids applied are kept in the item), so a retried restock does
    /// not add twice.
    pub async fn restock(
        &self,
        sku: &Sku,
        sale_id: &str,
        operation_id: &str,
        units: u64,
    ) -> Result<RestockWrite, DynamoError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("sku", s(sku.as_str()))
            .update_expression("ADD #total :units, restocks :op")
            .condition_expression(
                "sale_id = :sale AND (attribute_not_exists(restocks) OR NOT contains(restocks, :id))",
            )
            .expression_attribute_names("#total", "total")
            .expression_attribute_values(":units", n(units))
            .expression_attribute_values(":op", AttributeValue::Ss(vec![operation_id.to_owned()]))
            .expression_attribute_values(":id", s(operation_id))
            .expression_attribute_values(":sale", s(sale_id))
            .send()
            .await;
        match result {
            Ok(_) => Ok(RestockWrite::Applied),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                match self.get(sku).await? {
                    Some(sale) if sale.rules.sale_id == sale_id => Ok(RestockWrite::AlreadyApplied),
                    _ => Err(DynamoError::Refused(format!(
                        "{sku} no longer holds sale {sale_id}"
                    ))),
                }
            }
            Err(e) => Err(DynamoError::from_sdk(e)),
        }
    }

    /// Marks sale `sale_id` closed.
    pub async fn close(&self, sku: &Sku, sale_id: &str) -> Result<(), DynamoError> {
        self.client
            .update_item()
            .table_name(&self.table)
            .key("sku", s(sku.as_str()))
            .update_expression("SET closed = :t")
            .condition_expression("sale_id = :sale")
            .expression_attribute_values(":t", AttributeValue::Bool(true))
            .expression_attribute_values(":sale", s(sale_id))
            .send()
            .await
            .map_err(DynamoError::from_sdk)?;
        Ok(())
    }

    /// Every sku with a sale (a scan: for audits).
    pub async fn skus(&self) -> Result<Vec<Sku>, DynamoError> {
        let mut skus = Vec::new();
        let mut start = None;
        loop {
            let out = self
                .client
                .scan()
                .table_name(&self.table)
                .projection_expression("sku")
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(DynamoError::from_sdk)?;
            for attrs in out.items() {
                let raw = Item { key: "?", attrs }.string("sku")?;
                skus.push(Sku::parse(&raw).map_err(|e| DynamoError::Malformed {
                    key: raw.clone(),
                    problem: e.to_string(),
                })?);
            }
            match out.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => return Ok(skus),
            }
        }
    }

    pub async fn get(&self, sku: &Sku) -> Result<Option<Sale>, DynamoError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("sku", s(sku.as_str()))
            .consistent_read(true)
            .send()
            .await
            .map_err(DynamoError::from_sdk)?;
        let Some(attrs) = out.item() else {
            return Ok(None);
        };
        let item = Item {
            key: sku.as_str(),
            attrs,
        };
        Ok(Some(Sale {
            sku: sku.clone(),
            sold: item.number("sold")?,
            closed: attrs
                .get("closed")
                .and_then(|v| v.as_bool().ok())
                .copied()
                .unwrap_or(false),
            rules: SaleRules {
                sale_id: item.string("sale_id")?,
                total: item.number("total")?,
                per_user_limit: item.number("per_user_limit")?,
                price_cents: item.number("price_cents")?,
                reservation_ttl_ms: item.number("reservation_ttl_ms")?,
                starts_at_ms: item.number("starts_at_ms")?,
                ends_at_ms: item.number("ends_at_ms")?,
                // Sales created before admission control have none.
                overbook: attrs
                    .get("overbook")
                    .and_then(|v| v.as_n().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(crate::stock::DEFAULT_OVERBOOK),
            },
        }))
    }
}
