//! What the services ask of DynamoDB at start, against DynamoDB Local
//! (started by `./scripts/test`), seen through an SDK interceptor: the
//! calls a least-privilege policy (`infra/aws/dynamodb.yaml`) must allow.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure here is the test's answer

use std::sync::{Arc, Mutex};

use aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_dynamodb::error::BoxError;
use flashsale_core::dynamo::{self, Tables};
use flashsale_core::service::settings::DynamoSettings;

/// The DynamoDB operations a client sent, by name (`DescribeTable`).
#[derive(Debug, Clone, Default)]
struct Calls(Arc<Mutex<Vec<String>>>);

impl Calls {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl Intercept for Calls {
    fn name(&self) -> &'static str {
        "Calls"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        // `X-Amz-Target: DynamoDB_20120810.<Operation>`
        if let Some(target) = context.request().headers().get("x-amz-target") {
            let operation = target.rsplit('.').next().unwrap_or(target);
            self.0.lock().unwrap().push(operation.to_owned());
        }
        Ok(())
    }
}

#[tokio::test]
async fn tables_that_exist_are_described_and_never_created_again() {
    let settings = DynamoSettings {
        endpoint: Some(
            std::env::var("FLASHSALE_DYNAMODB_ENDPOINT")
                .unwrap_or_else(|_| "http://127.0.0.1:28000".into()),
        ),
        table_prefix: format!("calls{}-", &uuid::Uuid::now_v7().simple().to_string()[20..]),
    };
    let calls = Calls::default();
    let client = dynamo::client(&settings).await;
    let watched = aws_sdk_dynamodb::Client::from_conf(
        client
            .config()
            .to_builder()
            .interceptor(calls.clone())
            .build(),
    );
    let tables = Tables::new(&settings);

    dynamo::ensure_tables(&watched, &tables).await.unwrap();
    let first = calls.take();
    assert_eq!(
        first.iter().filter(|c| *c == "CreateTable").count(),
        2,
        "missing tables are created: {first:?}"
    );

    // What every later start does, on tables CloudFormation made: the
    // services' policies need DescribeTable, not CreateTable.
    dynamo::ensure_tables(&watched, &tables).await.unwrap();
    let again = calls.take();
    assert!(!again.is_empty());
    assert!(
        again.iter().all(|c| c == "DescribeTable"),
        "on existing tables: {again:?}"
    );
}
