//! Sales as an operator handles them: create, show, restock, close.
//!
//! DynamoDB's `inventory` item is the source of truth for what a sale is,
//! so every change is written there first and then applied to Redis, each
//! side idempotent: a command that died half-way is simply run again.

use std::time::Duration;

use flashsale_core::clock;
use flashsale_core::dynamo::inventory::{RestockWrite, Sale};
use flashsale_core::ids::Sku;
use flashsale_core::stock::{Restocked, SaleRules, SkuStatus};
use serde::Serialize;
use uuid::Uuid;

use crate::Stores;

#[derive(Debug, Clone)]
pub struct SaleSpec {
    pub sku: Sku,
    pub stock: u64,
    pub per_user_limit: u64,
    pub price_cents: u64,
    pub reservation_ttl: Duration,
    /// From now until the sale opens; before it, `sale_not_active`.
    pub starts_in: Duration,
    /// From the opening; the sale rejects purchases after it.
    pub duration: Duration,
    /// Purchases let into the queue per available unit (`SaleRules::overbook`).
    pub overbook: f64,
}

/// Why a sale cannot be created as asked.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum InvalidSale {
    #[error("the price must be at least 1 cent: a processor refuses a charge of 0")]
    Free,
    #[error("the per-user limit must be at least 1: nobody could buy")]
    NoLimit,
    #[error("the reservation TTL must be at least 1 s: a buyer needs time to pay")]
    TtlTooShort,
    #[error("the duration must be at least 1 s")]
    NoDuration,
    #[error("the overbook must be a number from 1 to 100 (buyers per unit), not {0}")]
    Overbook(f64),
}

impl SaleSpec {
    /// Whether a sale like this can sell to anyone, for money. (No stock
    /// is allowed: a sale announced sold out, or to be restocked.)
    pub fn check(&self) -> Result<(), InvalidSale> {
        if self.price_cents == 0 {
            return Err(InvalidSale::Free);
        }
        if self.per_user_limit == 0 {
            return Err(InvalidSale::NoLimit);
        }
        if self.reservation_ttl < Duration::from_secs(1) {
            return Err(InvalidSale::TtlTooShort);
        }
        if self.duration < Duration::from_secs(1) {
            return Err(InvalidSale::NoDuration);
        }
        if !(self.overbook.is_finite() && (1.0..=100.0).contains(&self.overbook)) {
            return Err(InvalidSale::Overbook(self.overbook));
        }
        Ok(())
    }
}

/// `create`, unless the sku already has an open sale and `replace` was not
/// asked for: an operator replaces a running sale only on purpose.
pub async fn create_unless_open(
    stores: &Stores,
    spec: &SaleSpec,
    replace: bool,
) -> anyhow::Result<SaleRules> {
    if let Some(open) = stores.inventory.get(&spec.sku).await?
        && !open.closed
        && !replace
    {
        anyhow::bail!(
            "{} already has an open sale ({}); close it first or pass --replace",
            spec.sku,
            open.rules.sale_id
        );
    }
    create(stores, spec).await
}

/// Creates the sale, or replaces the sku's sale: a new sale id, fresh stock,
/// per-user counts forgotten; orders and charges of the earlier sale are
/// not counted in this one. A spec that fails `SaleSpec::check` is refused
/// before anything is written.
pub async fn create(stores: &Stores, spec: &SaleSpec) -> anyhow::Result<SaleRules> {
    spec.check()
        .map_err(|why| anyhow::anyhow!("cannot create the sale of {}: {why}", spec.sku))?;
    let starts_at_ms = clock::now_ms().saturating_add(spec.starts_in.as_millis() as u64);
    let rules = SaleRules {
        sale_id: Uuid::now_v7().to_string(),
        total: spec.stock,
        per_user_limit: spec.per_user_limit,
        price_cents: spec.price_cents,
        reservation_ttl_ms: spec.reservation_ttl.as_millis() as u64,
        starts_at_ms,
        ends_at_ms: starts_at_ms.saturating_add(spec.duration.as_millis() as u64),
        overbook: spec.overbook,
    };
    stores.inventory.put(&spec.sku, &rules).await?;
    let stored = existing(stores, &spec.sku).await?;
    stores.stock.open_sale(&spec.sku, &stored.rules).await?;
    Ok(stored.rules)
}

async fn existing(stores: &Stores, sku: &Sku) -> anyhow::Result<Sale> {
    stores.inventory.get(sku).await?.ok_or_else(|| {
        anyhow::anyhow!("{sku} has no sale (create one with `flashsale sale create`)")
    })
}

/// A sale as both stores see it.
#[derive(Debug, Clone, Serialize)]
pub struct SaleView {
    pub sku: String,
    pub rules: SaleRules,
    pub closed: bool,
    pub sold_in_dynamodb: u64,
    /// `None` when Redis holds nothing for the sku (lost: recover it).
    pub redis: Option<SkuStatus>,
}

pub async fn show(stores: &Stores, sku: &Sku) -> anyhow::Result<Option<SaleView>> {
    let Some(sale) = stores.inventory.get(sku).await? else {
        return Ok(None);
    };
    let redis = stores.stock.status(sku, clock::now_ms()).await?;
    Ok(Some(SaleView {
        sku: sku.to_string(),
        rules: sale.rules,
        closed: sale.closed,
        sold_in_dynamodb: sale.sold,
        redis,
    }))
}

/// Adds units to the running sale. Give the same `operation_id` when
/// retrying a restock whose outcome is unknown: it is applied once.
pub async fn restock(
    stores: &Stores,
    sku: &Sku,
    units: u64,
    operation_id: &str,
) -> anyhow::Result<Restocked> {
    if units == 0 {
        anyhow::bail!("a restock adds at least one unit");
    }
    let sale = existing(stores, sku).await?;
    let written = stores
        .inventory
        .restock(sku, &sale.rules.sale_id, operation_id, units)
        .await?;
    if written == RestockWrite::AlreadyApplied {
        tracing::info!(%sku, operation_id, "restock already in DynamoDB; applying to Redis");
    }
    Ok(stores
        .stock
        .restock(sku, operation_id, units, flashsale_core::clock::now_ms())
        .await?)
}

/// Stops the sale: new requests are rejected with `sale_not_active`;
/// reservations already made still complete or are released.
pub async fn close(stores: &Stores, sku: &Sku) -> anyhow::Result<()> {
    let sale = existing(stores, sku).await?;
    stores.inventory.close(sku, &sale.rules.sale_id).await?;
    stores.stock.close(sku).await?;
    Ok(())
}
