//! What a test asks the pipeline through: the gateway's HTTP API, the
//! services' metrics, the stores, and the topics.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: a failure is the test's answer

use std::time::Duration;

use flashsale_core::bus::kafka::{self, topic};
use flashsale_core::bus::topic_reader;
use flashsale_core::dynamo::orders::Order;
use flashsale_core::ids::{RequestId, Sku};
use flashsale_core::status::PurchaseStatus;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::FutureProducer;

use crate::{Pipeline, eventually};

/// A gateway's answer: status, headers and JSON body (`Null` if none).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: serde_json::Value,
}

impl Answer {
    pub async fn of(response: reqwest::Response) -> anyhow::Result<Self> {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await?;
        Ok(Self {
            status,
            headers,
            body: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        })
    }

    /// The problem type of a refusal (`sold-out`, `sale-not-active`, ...).
    pub fn kind(&self) -> &str {
        self.body["type"].as_str().unwrap_or("")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `Retry-After` in seconds, if given.
    pub fn retry_after(&self) -> Option<u64> {
        self.header("retry-after").and_then(|v| v.parse().ok())
    }
}

impl Pipeline {
    /// A service's `/metrics` text; empty when it cannot be read.
    pub async fn samples(&self, base_url: &str) -> String {
        match self.http.get(format!("{base_url}/metrics")).send().await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// The value of one sample of a service's `/metrics`, e.g.
    /// `gateway_shed_total{reason="sold_out"}`; 0 when absent.
    pub async fn metric(&self, base_url: &str, sample: &str) -> f64 {
        self.samples(base_url)
            .await
            .lines()
            .find_map(|line| {
                line.strip_prefix(sample)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .and_then(|value| value.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }

    /// POSTs a purchase of one unit; `Err` only if the gateway could not
    /// be reached at all.
    pub async fn try_buy(
        &self,
        sku: &str,
        user: &str,
        key: Option<&str>,
    ) -> reqwest::Result<(u16, serde_json::Value)> {
        let mut request = self
            .http
            .post(format!("{}/v1/purchases", self.gateway_url))
            .json(&serde_json::json!({"sku": sku, "user_id": user, "quantity": 1}));
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        Ok((
            status,
            response.json().await.unwrap_or(serde_json::Value::Null),
        ))
    }

    /// `GET /v1/skus/{sku}` of the gateway at `base_url`: `None` while it
    /// does not answer with one.
    pub async fn sku_view(&self, base_url: &str, sku: &Sku) -> Option<serde_json::Value> {
        self.http
            .get(format!("{base_url}/v1/skus/{sku}"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()
    }

    /// POSTs one unit of `sku` for `user` to the gateway at `base_url`,
    /// with the response's headers.
    pub async fn post_purchase(
        &self,
        base_url: &str,
        sku: &str,
        user: &str,
        key: Option<&str>,
    ) -> anyhow::Result<Answer> {
        let mut request = self
            .http
            .post(format!("{base_url}/v1/purchases"))
            .json(&serde_json::json!({"sku": sku, "user_id": user, "quantity": 1}));
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        Answer::of(request.send().await?).await
    }

    /// `try_buy`, for gateways that must answer.
    pub async fn buy(&self, sku: &str, user: &str, key: Option<&str>) -> (u16, serde_json::Value) {
        self.try_buy(sku, user, key).await.expect("gateway answers")
    }

    /// GET with a long poll: `None` while the gateway does not know the id
    /// (or cannot answer).
    pub async fn status_of(&self, id: &str, wait_secs: u64) -> Option<PurchaseStatus> {
        let url = format!("{}/v1/purchases/{id}?wait={wait_secs}", self.gateway_url);
        let response = self.http.get(&url).send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.json().await.ok()
    }

    /// The order stored in DynamoDB for the request id the gateway answered.
    pub async fn order(&self, id: &str) -> Option<Order> {
        let id = RequestId::parse(id).expect("a request id");
        self.stores.orders.get(id).await.expect("DynamoDB answers")
    }

    /// Waits (up to a minute) for the purchase's terminal state.
    pub async fn terminal(&self, id: &str) -> PurchaseStatus {
        eventually("a terminal state", Duration::from_secs(60), || async {
            self.status_of(id, 5)
                .await
                .filter(|s| s.status.is_terminal())
        })
        .await
    }

    pub fn topic(&self, base: &str) -> String {
        self.kafka.topic(base)
    }

    pub fn producer(&self) -> anyhow::Result<FutureProducer> {
        Ok(kafka::producer(&self.kafka)?)
    }

    /// How many records a topic holds (sum of high watermarks).
    pub async fn records_in(&self, topic_name: &str) -> anyhow::Result<i64> {
        Ok(topic_reader::watermarks(&self.kafka, topic_name)
            .await?
            .iter()
            .map(|r| r.high - r.low)
            .sum())
    }

    /// Offsets the consumer group `group_base` has committed on a topic,
    /// summed over its partitions (0 where nothing is committed yet).
    pub async fn committed(&self, group_base: &str, topic_name: &str) -> anyhow::Result<i64> {
        Ok(
            topic_reader::committed(&self.kafka, &self.kafka.group(group_base), topic_name)
                .await?
                .iter()
                .filter_map(|(_, offset)| *offset)
                .sum(),
        )
    }

    /// The first record of a topic, waiting up to `deadline` for one.
    pub async fn first_record(
        &self,
        topic_name: &str,
        deadline: Duration,
    ) -> anyhow::Result<OwnedMessage> {
        let consumer: StreamConsumer = kafka::base_config(&self.kafka)
            .set(
                "group.id",
                format!("{}reader-{}", self.prefix, uuid::Uuid::now_v7().simple()),
            )
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()?;
        consumer.subscribe(&[topic_name])?;
        let message = tokio::time::timeout(deadline, consumer.recv()).await??;
        Ok(message.detach())
    }

    pub fn purchase_topic(&self) -> String {
        self.topic(topic::PURCHASE_REQUESTS)
    }
}

/// What headless Chromium (installed by `infra/local/install.sh`) made of
/// an HTML page once its scripts ran: the DOM as the browser holds it.
pub fn dom_in_chromium(page: &std::path::Path) -> anyhow::Result<String> {
    let page = page.canonicalize()?;
    let output = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            // Offline: a report must need no network.
            "--proxy-server=127.0.0.1:9",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("file://{}", page.display()))
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}
