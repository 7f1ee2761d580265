//! The `flashsale` command's library: setting up sales, auditing them, and
//! the surge load generator. Kept apart from `main.rs` so tests drive
//! the very code an operator runs.

pub mod audit;
pub mod crowd;
pub mod histogram;
pub mod html;
pub mod lag;
pub mod merge;
pub mod order;
pub mod progress;
pub mod recover;
pub mod sale;
pub mod sampler;
pub mod setup;
pub mod surge;
pub mod thresholds;

use std::time::Duration;

use flashsale_core::dynamo::inventory::InventoryStore;
use flashsale_core::dynamo::orders::OrderStore;
use flashsale_core::dynamo::{self, Tables};
use flashsale_core::payment::PaymentClient;
use flashsale_core::service::settings::{
    self, DynamoSettings, Env, KafkaSettings, RedisSettings, SettingError,
};
use flashsale_core::status::board::StatusBoard;
use flashsale_core::stock::{self, StockError, StockStore};

/// Where the command finds the pipeline: the same `FLASHSALE_*` settings
/// the services read, so defaults reach the local stack.
#[derive(Debug, Clone)]
pub struct Config {
    pub kafka: KafkaSettings,
    pub redis: RedisSettings,
    pub dynamo: DynamoSettings,
    pub payment_url: String,
    /// `FLASHSALE_GATEWAY_URL`: the gateway the surge sends buyers to.
    pub gateway_url: String,
}

impl Config {
    pub fn from_env(env: &Env) -> Result<Self, SettingError> {
        Ok(Self {
            kafka: KafkaSettings::from_env(env)?,
            redis: RedisSettings::from_env(env)?,
            dynamo: DynamoSettings::from_env(env)?,
            payment_url: settings::payment_url(env),
            gateway_url: env.string("GATEWAY_URL", "http://127.0.0.1:8080"),
        })
    }
}

/// Clients of every store the command reads or writes.
#[derive(Debug, Clone)]
pub struct Stores {
    pub stock: StockStore,
    pub board: StatusBoard,
    pub inventory: InventoryStore,
    pub orders: OrderStore,
    pub payment: PaymentClient,
}

impl Stores {
    /// Gathers what the audit of `sku` looks at and checks the invariants.
    pub async fn audit(
        &self,
        sku: &flashsale_core::ids::Sku,
        at_rest: bool,
    ) -> Result<audit::Report, audit::GatherError> {
        let evidence = audit::gather(
            sku,
            &self.stock,
            &self.inventory,
            &self.orders,
            &self.payment,
        )
        .await?;
        Ok(audit::check(&evidence, at_rest))
    }

    /// Rebuilds `sku` in Redis after Redis was lost.
    pub async fn recover(
        &self,
        config: &Config,
        sku: &flashsale_core::ids::Sku,
        force: bool,
    ) -> Result<recover::Recovered, recover::RecoveryError> {
        let sources = recover::Sources {
            stock: &self.stock,
            inventory: &self.inventory,
            orders: &self.orders,
            payment: &self.payment,
            kafka: &config.kafka,
        };
        recover::recover(&sources, sku, force).await
    }

    /// Connects, creating the DynamoDB tables if they are missing.
    pub async fn connect(config: &Config) -> anyhow::Result<Self> {
        let conn = stock::connect(&config.redis)
            .await
            .map_err(|e: StockError| {
                anyhow::anyhow!("connecting to Redis at {}: {e}", config.redis.describe())
            })?;
        let client = dynamo::client(&config.dynamo).await;
        let tables = Tables::new(&config.dynamo);
        dynamo::ensure_tables(&client, &tables).await?;
        Ok(Self {
            stock: StockStore::new(conn.clone(), &config.redis),
            board: StatusBoard::new(conn, &config.redis),
            inventory: InventoryStore::new(client.clone(), &tables),
            orders: OrderStore::new(client, &tables),
            payment: PaymentClient::new(&config.payment_url, Duration::from_secs(10)),
        })
    }
}
