//! Creating a sale: DynamoDB's `inventory` item is written first (it is the
//! source of truth), then Redis is loaded from what DynamoDB holds.

use std::time::Duration;

use flashsale_core::clock;
use flashsale_core::ids::Sku;
use flashsale_core::stock::SaleRules;
use uuid::Uuid;

use crate::Stores;

#[derive(Debug, Clone)]
pub struct SaleSpec {
    pub sku: Sku,
    pub stock: u64,
    pub per_user_limit: u64,
    pub price_cents: u64,
    pub reservation_ttl: Duration,
    /// From now; the sale rejects purchases after it (`sale_not_active`).
    pub duration: Duration,
}

/// Creates the sale, or resets it if the sku had one: a new sale id, so
/// orders and charges of the earlier sale are not counted in this one.
pub async fn create(stores: &Stores, spec: &SaleSpec) -> anyhow::Result<SaleRules> {
    let now = clock::now_ms();
    let rules = SaleRules {
        sale_id: Uuid::now_v7().to_string(),
        total: spec.stock,
        per_user_limit: spec.per_user_limit,
        price_cents: spec.price_cents,
        reservation_ttl_ms: spec.reservation_ttl.as_millis() as u64,
        starts_at_ms: now,
        ends_at_ms: now.saturating_add(spec.duration.as_millis() as u64),
    };
    stores.inventory.put(&spec.sku, &rules).await?;
    let stored = stores
        .inventory
        .get(&spec.sku)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the sale of {} vanished from DynamoDB", spec.sku))?;
    stores.stock.load_sale(&spec.sku, &stored.rules).await?;
    Ok(stored.rules)
}
