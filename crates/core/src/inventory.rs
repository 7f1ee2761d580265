//! The `inventory` table: one item per sku, the source of truth for what a
//! sale is (its total and rules) and for how many units were sold.

use aws_sdk_dynamodb::Client;

use crate::dynamo::{DynamoError, Item, Tables, n, s};
use crate::ids::Sku;
use crate::stock::SaleRules;

#[derive(Debug, Clone, PartialEq)]
pub struct Sale {
    pub sku: Sku,
    pub rules: SaleRules,
    /// Units whose order is `CONFIRMED`; moved only by the confirm transaction.
    pub sold: u64,
}

#[derive(Clone)]
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
            rules: SaleRules {
                sale_id: item.string("sale_id")?,
                total: item.number("total")?,
                per_user_limit: item.number("per_user_limit")?,
                price_cents: item.number("price_cents")?,
                reservation_ttl_ms: item.number("reservation_ttl_ms")?,
                starts_at_ms: item.number("starts_at_ms")?,
                ends_at_ms: item.number("ends_at_ms")?,
            },
        }))
    }
}
