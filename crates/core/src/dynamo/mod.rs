//! DynamoDB client and the project's two tables.
//!
//! The client follows the standard AWS configuration chain. When
//! `FLASHSALE_DYNAMODB_ENDPOINT` names a local endpoint (the default:
//! DynamoDB Local) and no AWS credentials are configured, it signs with
//! placeholder credentials, which DynamoDB Local accepts.

pub mod inventory;
pub mod orders;

use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::config::{Credentials, Region};
use aws_sdk_dynamodb::error::{BuildError, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType, TableStatus,
};

use crate::service::settings::DynamoSettings;

#[derive(Debug, thiserror::Error)]
pub enum DynamoError {
    /// Throttling, a 5xx, a timeout or no connection: worth retrying.
    #[error("DynamoDB request failed: {0}")]
    Request(String),
    /// DynamoDB refused the request itself; retrying the same one will not help.
    #[error("DynamoDB refused the request: {0}")]
    Refused(String),
    #[error("building a DynamoDB request failed: {0}")]
    Build(#[from] BuildError),
    #[error("table {0} did not become active in time")]
    TableNotActive(String),
    #[error("item {key} is malformed: {problem}")]
    Malformed { key: String, problem: String },
}

impl DynamoError {
    pub fn from_sdk<E>(error: SdkError<E, HttpResponse>) -> Self
    where
        E: std::error::Error + ProvideErrorMetadata + 'static,
    {
        const RETRYABLE: [&str; 6] = [
            "ThrottlingException",
            "ProvisionedThroughputExceededException",
            "RequestLimitExceeded",
            "InternalServerError",
            "ServiceUnavailable",
            "TransactionInProgressException",
        ];
        let text = aws_sdk_dynamodb::error::DisplayErrorContext(&error).to_string();
        match &error {
            SdkError::ServiceError(service) => {
                let code = service.err().code().unwrap_or_default();
                let server_side = service.raw().status().is_server_error();
                if server_side || RETRYABLE.contains(&code) {
                    Self::Request(text)
                } else {
                    Self::Refused(text)
                }
            }
            _ => Self::Request(text),
        }
    }
}

/// Names of the project's tables, with the configured prefix.
#[derive(Debug, Clone)]
pub struct Tables {
    pub orders: String,
    pub inventory: String,
}

impl Tables {
    pub fn new(settings: &DynamoSettings) -> Self {
        Self {
            orders: format!("{}orders", settings.table_prefix),
            inventory: format!("{}inventory", settings.table_prefix),
        }
    }
}

pub async fn client(settings: &DynamoSettings) -> Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    let local = settings.endpoint.is_some();
    let region_set = ["AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"]
        .iter()
        .any(|var| std::env::var_os(var).is_some());
    if local && !region_set {
        // Otherwise the chain asks the EC2 metadata service, which a laptop
        // or CI machine does not have, and logs its failure.
        loader = loader.region(Region::new("us-east-1"));
    }
    let credentials_set = [
        "AWS_ACCESS_KEY_ID",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ]
    .iter()
    .any(|var| std::env::var_os(var).is_some());
    if local && !credentials_set {
        loader = loader.credentials_provider(Credentials::new(
            "local",
            "local",
            None,
            None,
            "flashsale-local",
        ));
    }
    let shared = loader.load().await;
    let mut builder = aws_sdk_dynamodb::config::Builder::from(&shared);
    if let Some(endpoint) = &settings.endpoint {
        builder = builder.endpoint_url(endpoint);
    }
    Client::from_conf(builder.build())
}

/// Each table of the pipeline and its hash key (a string).
pub fn expected_tables(tables: &Tables) -> [(&str, &'static str); 2] {
    [(&tables.orders, "order_id"), (&tables.inventory, "sku")]
}

/// How an existing table is laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableShape {
    /// The hash key's name and type (`S`), if it has one.
    pub hash_key: Option<(String, String)>,
    /// Whether it has a sort key (ours have none).
    pub sort_key: bool,
    /// `PAY_PER_REQUEST` or `PROVISIONED`.
    pub billing: String,
    pub active: bool,
}

/// The shape of `table`, `None` if it does not exist.
pub async fn describe_table(
    client: &Client,
    table: &str,
) -> Result<Option<TableShape>, DynamoError> {
    let described = match client.describe_table().table_name(table).send().await {
        Ok(described) => described,
        Err(error)
            if error
                .as_service_error()
                .is_some_and(|e| e.is_resource_not_found_exception()) =>
        {
            return Ok(None);
        }
        Err(error) => return Err(DynamoError::from_sdk(error)),
    };
    let Some(table) = described.table() else {
        return Ok(None);
    };
    let key_of = |kind: KeyType| {
        table
            .key_schema()
            .iter()
            .find(|k| *k.key_type() == kind)
            .map(|k| k.attribute_name().to_owned())
    };
    let hash_key = key_of(KeyType::Hash).map(|name| {
        let kind = table
            .attribute_definitions()
            .iter()
            .find(|d| d.attribute_name() == name)
            .map(|d| d.attribute_type().as_str().to_owned())
            .unwrap_or_default();
        (name, kind)
    });
    Ok(Some(TableShape {
        hash_key,
        sort_key: key_of(KeyType::Range).is_some(),
        billing: table
            .billing_mode_summary()
            .and_then(|b| b.billing_mode())
            .map_or("PROVISIONED", |m| m.as_str())
            .to_owned(),
        active: table.table_status() == Some(&TableStatus::Active),
    }))
}

/// Creates `orders` and `inventory` if they do not exist, and waits until
/// both are active. Safe to run from every service at start.
///
/// It looks before it creates: tables made beforehand (by
/// `infra/aws/dynamodb.yaml`) are only described, so a service's policy
/// needs `DescribeTable` and not `CreateTable`.
pub async fn ensure_tables(client: &Client, tables: &Tables) -> Result<(), DynamoError> {
    for (table, key) in expected_tables(tables) {
        match describe_table(client, table).await? {
            Some(shape) if shape.active => continue,
            // Being created: by another service starting, or a stack.
            Some(_) => {}
            None => create_table(client, table, key).await?,
        }
        wait_active(client, table).await?;
    }
    Ok(())
}

/// Creates `table` keyed by the string `key`, on-demand; a table someone
/// else created meanwhile is as good.
async fn create_table(client: &Client, table: &str, key: &str) -> Result<(), DynamoError> {
    let created = client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name(key)
                .key_type(KeyType::Hash)
                .build()?,
        )
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name(key)
                .attribute_type(ScalarAttributeType::S)
                .build()?,
        )
        .send()
        .await;
    if let Err(error) = created {
        let exists = error
            .as_service_error()
            .is_some_and(|e| e.is_resource_in_use_exception());
        if !exists {
            return Err(DynamoError::from_sdk(error));
        }
    }
    Ok(())
}

async fn wait_active(client: &Client, table: &str) -> Result<(), DynamoError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let described = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(DynamoError::from_sdk)?;
        let status = described.table().and_then(|t| t.table_status());
        if status == Some(&TableStatus::Active) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(DynamoError::TableNotActive(table.to_owned()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads of item attributes that name the item when something is missing.
#[derive(Debug)]
pub struct Item<'a> {
    pub key: &'a str,
    pub attrs: &'a std::collections::HashMap<String, AttributeValue>,
}

impl Item<'_> {
    pub fn string(&self, name: &str) -> Result<String, DynamoError> {
        self.attrs
            .get(name)
            .and_then(|v| v.as_s().ok())
            .cloned()
            .ok_or_else(|| self.malformed(name))
    }

    pub fn optional_number(&self, name: &str) -> Option<u64> {
        self.attrs
            .get(name)
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse().ok())
    }

    pub fn optional_string(&self, name: &str) -> Option<String> {
        self.attrs.get(name).and_then(|v| v.as_s().ok()).cloned()
    }

    pub fn number(&self, name: &str) -> Result<u64, DynamoError> {
        self.attrs
            .get(name)
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| self.malformed(name))
    }

    fn malformed(&self, name: &str) -> DynamoError {
        DynamoError::Malformed {
            key: self.key.to_owned(),
            problem: format!("attribute {name} is missing or of the wrong type"),
        }
    }
}

pub fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

pub fn n(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}
