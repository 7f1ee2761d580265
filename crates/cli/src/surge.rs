//! `flashsale surge`: replays a flash-sale crowd against the gateway and
//! gives a verdict.
//!
//! Open model: buyer *i* is due at a fixed instant (all at once for a
//! burst, `i / rate` seconds in otherwise), whatever happened to earlier
//! buyers. Latencies are measured from that intended instant, so time spent
//! waiting for a free connection counts against the system (no coordinated
//! omission). After the crowd, it waits for every accepted purchase to
//! reach a terminal state, then runs the audit.

use std::sync::Arc;
use std::time::Duration;

use flashsale_core::clock;
use flashsale_core::ids::{RequestId, Sku};
use flashsale_core::payment::StubBehaviour;
use flashsale_core::status::PurchaseState;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::Stores;
use crate::sale::{self, SaleSpec};

#[derive(Debug, Clone, Copy)]
pub enum Arrival {
    /// Every buyer at the same instant.
    Burst,
    /// Buyers arrive evenly at this many per second.
    Rate(f64),
}

#[derive(Debug, Clone)]
pub struct SurgeOptions {
    pub gateway_url: String,
    pub sku: Sku,
    pub stock: u64,
    pub buyers: u64,
    pub arrival: Arrival,
    pub per_user_limit: u64,
    /// The sale's overbook (`SaleRules::overbook`).
    pub overbook: f64,
    pub payment_decline_rate: f64,
    pub payment_latency_ms: u64,
    /// Concurrent HTTP connections to the gateway.
    pub connections: usize,
    /// How many times a buyer answered `429` or `503` tries again, after
    /// the `Retry-After` it was given, with the same Idempotency-Key, as a
    /// real client does. 0: every buyer asks once.
    pub max_retries: u32,
    /// How long to wait for accepted purchases to settle.
    pub settle_timeout: Duration,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Shed {
    pub sold_out: u64,
    pub rate_limited: u64,
    pub overloaded: u64,
    pub invalid: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SurgeReport {
    pub buyers: u64,
    pub accepted: u64,
    /// Requests sent again after a `429` or `503` (see `max_retries`); a
    /// buyer counts in `shed` by its last answer.
    #[serde(default)]
    pub retries: u64,
    pub shed: Shed,
    /// Requests that got no HTTP answer, or a `5xx` other than `503`.
    pub errors: u64,
    pub confirmed: u64,
    pub cancelled: u64,
    pub rejected: u64,
    /// Accepted purchases still not terminal when the settle timeout ran out.
    pub unsettled: u64,
    pub units_sold: i64,
    pub stock: u64,
    pub oversold: i64,
    pub audit_ok: bool,
    pub violations: Vec<String>,
    /// From a buyer's intended send time to the gateway's answer.
    pub accept_latency_ms: Latency,
    /// From a buyer's intended send time to the terminal state of an
    /// accepted purchase (confirmed, cancelled or rejected).
    pub decision_latency_ms: Latency,
    /// Accepted purchases per second while the crowd was arriving.
    pub accept_rps: f64,
    /// Gateway answers of any kind per second while the crowd was arriving.
    pub answered_rps: f64,
    pub duration_s: f64,
}

impl SurgeReport {
    /// A verdict a person can read at a glance.
    pub fn human(&self) -> String {
        let verdict = if self.audit_ok && self.unsettled == 0 && self.errors == 0 {
            "PASS"
        } else {
            "FAIL"
        };
        let mut out = format!(
            "surge: {} buyers for {} units in {:.1}s\n\
             \x20 accepted {} ({:.0}/s) after {} retries, shed: sold out {}, rate limited {}, overloaded {}, invalid {}; errors {}\n\
             \x20 outcome: confirmed {}, cancelled {}, rejected {}, unsettled {}\n\
             \x20 units sold {} of {} (oversold {})\n\
             \x20 accept latency   p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms\n\
             \x20 decision latency p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms\n\
             audit: {}\n",
            self.buyers,
            self.stock,
            self.duration_s,
            self.accepted,
            self.accept_rps,
            self.retries,
            self.shed.sold_out,
            self.shed.rate_limited,
            self.shed.overloaded,
            self.shed.invalid,
            self.errors,
            self.confirmed,
            self.cancelled,
            self.rejected,
            self.unsettled,
            self.units_sold,
            self.stock,
            self.oversold,
            self.accept_latency_ms.p50,
            self.accept_latency_ms.p99,
            self.accept_latency_ms.max,
            self.decision_latency_ms.p50,
            self.decision_latency_ms.p99,
            self.decision_latency_ms.max,
            if self.audit_ok { "clean" } else { "VIOLATIONS" },
        );
        for violation in &self.violations {
            out.push_str(&format!("  - {violation}\n"));
        }
        out.push_str(&format!("verdict: {verdict}\n"));
        out
    }
}

enum Answer {
    Accepted { id: RequestId, due_unix_ms: u64 },
    SoldOut,
    RateLimited,
    Overloaded,
    Invalid,
    Error,
}

/// One POST of a buyer: its answer, and the `Retry-After` it was given (1 s
/// when the gateway gave none).
async fn ask(
    http: &reqwest::Client,
    url: &str,
    connections: &Semaphore,
    key: &str,
    body: &serde_json::Value,
    due_unix_ms: u64,
) -> (Answer, Option<Duration>) {
    // A connection is held for the request only, not while waiting to retry.
    let Ok(_permit) = connections.acquire().await else {
        return (Answer::Error, None);
    };
    let response = match http
        .post(url)
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await
    {
        Ok(response) => response,
        Err(_) => return (Answer::Error, None),
    };
    let wait = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(Duration::from_secs(1), Duration::from_secs);
    let answer = match response.status().as_u16() {
        202 => match response
            .json::<AcceptedBody>()
            .await
            .ok()
            .and_then(|b| RequestId::parse(&b.request_id).ok())
        {
            Some(id) => Answer::Accepted { id, due_unix_ms },
            None => Answer::Error,
        },
        409 => Answer::SoldOut,
        429 => Answer::RateLimited,
        503 => Answer::Overloaded,
        400..=499 => Answer::Invalid,
        _ => Answer::Error,
    };
    (answer, Some(wait))
}

#[derive(Deserialize)]
struct AcceptedBody {
    request_id: String,
}

fn histogram() -> Histogram<u64> {
    // Microseconds, up to an hour, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant bounds are valid")
}

fn latency(h: &Histogram<u64>) -> Latency {
    let ms = |us: u64| us as f64 / 1000.0;
    if h.is_empty() {
        return Latency::default();
    }
    Latency {
        p50: ms(h.value_at_quantile(0.50)),
        p99: ms(h.value_at_quantile(0.99)),
        max: ms(h.max()),
    }
}

pub async fn run(stores: &Stores, options: &SurgeOptions) -> anyhow::Result<SurgeReport> {
    stores
        .payment
        .set_behaviour(&StubBehaviour::simple(
            options.payment_decline_rate,
            options.payment_latency_ms,
        ))
        .await?;
    sale::create(
        stores,
        &SaleSpec {
            sku: options.sku.clone(),
            stock: options.stock,
            per_user_limit: options.per_user_limit,
            price_cents: 1999,
            reservation_ttl: Duration::from_secs(600),
            starts_in: Duration::ZERO,
            duration: Duration::from_secs(3600),
            overbook: options.overbook,
        },
    )
    .await?;

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(options.connections)
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = format!("{}/v1/purchases", options.gateway_url.trim_end_matches('/'));
    let run_id = &uuid::Uuid::now_v7().simple().to_string()[..12];
    let connections = Arc::new(Semaphore::new(options.connections.max(1)));
    // A short lead so spawning the crowd does not eat into the first arrivals.
    let lead = Duration::from_millis(100);
    let start = Instant::now() + lead;
    let start_unix_ms = clock::now_ms() + lead.as_millis() as u64;

    let mut tasks = Vec::with_capacity(options.buyers as usize);
    for i in 0..options.buyers {
        let offset = match options.arrival {
            Arrival::Burst => Duration::ZERO,
            Arrival::Rate(rate) => Duration::from_secs_f64(i as f64 / rate),
        };
        let (http, url, connections) = (http.clone(), url.clone(), connections.clone());
        let body = serde_json::json!({
            "sku": options.sku.as_str(),
            "user_id": format!("surge-{run_id}-{i}"),
            "quantity": 1,
        });
        let key = format!("surge-{run_id}-{i}");
        let max_retries = options.max_retries;
        tasks.push(tokio::spawn(async move {
            let due = start + offset;
            tokio::time::sleep_until(due).await;
            let due_unix_ms = start_unix_ms + offset.as_millis() as u64;
            let mut retries = 0u32;
            let answer = loop {
                match ask(&http, &url, &connections, &key, &body, due_unix_ms).await {
                    (Answer::RateLimited | Answer::Overloaded, Some(wait))
                        if retries < max_retries =>
                    {
                        retries += 1;
                        tokio::time::sleep(wait).await;
                    }
                    (answer, _) => break answer,
                }
            };
            (answer, retries, due.elapsed(), Instant::now())
        }));
    }

    let mut accept_latency = histogram();
    let mut shed = Shed::default();
    let mut errors = 0;
    let mut retries = 0u64;
    let mut accepted = Vec::new();
    let mut last_answer = start;
    for task in tasks {
        let (answer, tries, elapsed, answered_at) = task.await?;
        retries += u64::from(tries);
        let _ = accept_latency.record(elapsed.as_micros().max(1) as u64);
        last_answer = last_answer.max(answered_at);
        match answer {
            Answer::Accepted { id, due_unix_ms } => accepted.push((id, due_unix_ms)),
            Answer::SoldOut => shed.sold_out += 1,
            Answer::RateLimited => shed.rate_limited += 1,
            Answer::Overloaded => shed.overloaded += 1,
            Answer::Invalid => shed.invalid += 1,
            Answer::Error => errors += 1,
        }
    }
    let send_phase = last_answer
        .saturating_duration_since(start)
        .as_secs_f64()
        .max(1e-3);

    let settled = settle(stores, &accepted, options.settle_timeout).await?;
    let mut decision_latency = histogram();
    let (mut confirmed, mut cancelled, mut rejected) = (0, 0, 0);
    for (due_unix_ms, state, decided_ms) in &settled {
        let _ = decision_latency.record(decided_ms.saturating_sub(*due_unix_ms).max(1) * 1000);
        match state {
            PurchaseState::Confirmed => confirmed += 1,
            PurchaseState::Cancelled => cancelled += 1,
            _ => rejected += 1,
        }
    }
    let unsettled = (accepted.len() - settled.len()) as u64;

    let report = stores.audit(&options.sku, unsettled == 0).await?;
    let duration_s = start.elapsed().as_secs_f64();
    Ok(SurgeReport {
        buyers: options.buyers,
        accepted: accepted.len() as u64,
        shed,
        errors,
        confirmed,
        cancelled,
        rejected,
        unsettled,
        units_sold: report.sold,
        stock: options.stock,
        oversold: (report.sold - options.stock as i64).max(0),
        audit_ok: report.ok(),
        violations: report.violations,
        accept_latency_ms: latency(&accept_latency),
        decision_latency_ms: latency(&decision_latency),
        retries,
        accept_rps: accepted.len() as f64 / send_phase,
        answered_rps: options.buyers as f64 / send_phase,
        duration_s,
    })
}

/// Waits until every accepted purchase is terminal, or the timeout.
/// Returns `(due, terminal state, when it was reached)` of those that are.
async fn settle(
    stores: &Stores,
    accepted: &[(RequestId, u64)],
    timeout: Duration,
) -> anyhow::Result<Vec<(u64, PurchaseState, u64)>> {
    let deadline = Instant::now() + timeout;
    let mut open: Vec<(RequestId, u64)> = accepted.to_vec();
    let mut done = Vec::with_capacity(accepted.len());
    while !open.is_empty() && Instant::now() < deadline {
        let mut still_open = Vec::new();
        for chunk in open.chunks(2000) {
            let ids: Vec<RequestId> = chunk.iter().map(|(id, _)| *id).collect();
            let statuses = stores.board.get_many(&ids).await?;
            for ((id, due), status) in chunk.iter().zip(statuses) {
                match status {
                    Some(s) if s.status.is_terminal() => {
                        done.push((*due, s.status, s.updated_at_ms))
                    }
                    _ => still_open.push((*id, *due)),
                }
            }
        }
        open = still_open;
        if !open.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(done)
}
