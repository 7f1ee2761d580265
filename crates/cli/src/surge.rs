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
pub use crate::crowd::Arrival;
use crate::sale::{self, SaleSpec};
use crate::thresholds::{self, Checked, Threshold};

#[derive(Debug, Clone)]
pub struct SurgeOptions {
    pub gateway_url: String,
    pub sku: Sku,
    pub stock: u64,
    /// At most this many buyers (stages may bring fewer).
    pub buyers: u64,
    pub arrival: Arrival,
    /// The sale opens this long after the first buyer is due: buyers who
    /// come earlier take a place in the line, drawn at the opening, as on
    /// a real sale's first second.
    pub opens_in: Duration,
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
    /// Bearer tokens for a gateway that verifies them; None: buyers name
    /// themselves in the body.
    pub tokens: Option<TokenSigner>,
    /// Criteria the report must meet (`thresholds`).
    pub thresholds: Vec<Threshold>,
}

/// Signs each buyer an HS256 token with a test key, so that a load test
/// goes through the gateway's token check as real buyers would.
#[derive(Debug, Clone)]
pub struct TokenSigner {
    pub secret: String,
    pub issuer: String,
    pub audience: String,
}

impl TokenSigner {
    /// A token for `user`, valid for an hour.
    pub fn sign(&self, user: &str) -> anyhow::Result<String> {
        let now = clock::now_ms() / 1000;
        let claims = serde_json::json!({
            "sub": user,
            "iss": self.issuer,
            "aud": self.audience,
            "iat": now,
            "exp": now + 3600,
        });
        Ok(jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(self.secret.as_bytes())?,
        )?)
    }
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

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LineReport {
    pub waited: u64,
    /// Of those, served a unit that came back.
    pub served: u64,
    pub wait_ms: Latency,
}

/// First come, first served, as the buyers saw it. Arrival order is the
/// order in which their first request left the load generator.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Fairness {
    /// Buyers who got a unit (their purchase was reserved: confirmed, or
    /// cancelled after a decline or an expiry).
    pub winners: u64,
    /// Of the first `stock` arrivals, how many got a unit.
    pub winners_among_first: u64,
    /// Pairs (earlier, later) where the later arrival got a unit and the
    /// earlier one was refused or rejected without ever holding one.
    pub inversions: u64,
    /// Buyers refused while someone who arrived after them got a unit.
    pub passed_over: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
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
    /// From a buyer's intended send time to the gateway's first answer,
    /// whatever it was (a `503` later retried included).
    #[serde(default)]
    pub first_answer_ms: Latency,
    /// From a buyer's intended send time to the answer they keep: a
    /// refusal they did not retry, or the terminal state of their purchase.
    /// Buyers whose purchase did not settle are left out (see `unsettled`).
    #[serde(default)]
    pub final_answer_ms: Latency,
    /// From the first intended arrival until every unit was sold (the last
    /// confirmation); `null` when some stayed unsold.
    #[serde(default)]
    pub sold_out_after_s: Option<f64>,
    /// From the first intended arrival until every accepted purchase was
    /// terminal; `null` when some did not settle.
    #[serde(default)]
    pub all_decided_after_s: Option<f64>,
    /// Buyers who waited in the sku's line for a unit to come back, and for
    /// how long (from joining it to being served or turned away).
    #[serde(default)]
    pub line: LineReport,
    #[serde(default)]
    pub fairness: Fairness,
    /// Accepted purchases per second while the crowd was arriving.
    pub accept_rps: f64,
    /// Gateway answers of any kind per second while the crowd was arriving.
    pub answered_rps: f64,
    pub duration_s: f64,
    /// The surge second by second, from the first intended arrival.
    #[serde(default)]
    pub timeline: Vec<Second>,
    /// How each `--threshold` fared.
    #[serde(default)]
    pub thresholds: Vec<Checked>,
}

/// One second of a surge. Buyers count in the second their first request
/// was due; answers and decisions in the second they came.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Second {
    /// Seconds since the first intended arrival.
    pub t: u64,
    /// Buyers due to arrive.
    pub due: u64,
    /// Buyers whose last answer came in this second.
    pub answered: u64,
    /// Purchases accepted (`202`).
    pub accepted: u64,
    /// Buyers whose last answer was a refusal (sold out, limited,
    /// overloaded, invalid).
    pub shed: u64,
    pub errors: u64,
    /// Accepted purchases that reached a terminal state.
    pub decided: u64,
    pub confirmed: u64,
    /// The accept latency of the buyers answered in this second.
    pub accept_ms: Latency,
}

impl SurgeReport {
    /// A verdict a person can read at a glance.
    /// The surge's verdict: every purchase settled, no error, a clean audit.
    pub fn passed(&self) -> bool {
        self.audit_ok && self.unsettled == 0 && self.errors == 0
    }

    /// Every `--threshold` held (true when none was given).
    pub fn thresholds_held(&self) -> bool {
        self.thresholds.iter().all(|c| c.held)
    }

    pub fn human(&self) -> String {
        let verdict = match (self.passed(), self.thresholds_held()) {
            (true, true) => "PASS",
            (true, false) => "FAIL (thresholds)",
            (false, _) => "FAIL",
        };
        let mut out = format!(
            "surge: {} buyers for {} units in {:.1}s\n\
             \x20 accepted {} ({:.0}/s) after {} retries, shed: sold out {}, rate limited {}, overloaded {}, invalid {}; errors {}\n\
             \x20 outcome: confirmed {}, cancelled {}, rejected {}, unsettled {}\n\
             \x20 units sold {} of {} (oversold {})\n\
             \x20 accept latency   p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms\n\
             \x20 decision latency p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms\n\
             \x20 first answer     p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms\n\
             \x20 final answer     p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms\n\
             \x20 sold out after {}, all decided after {}\n\
             \x20 line: {} waited ({} served), wait p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms\n\
             \x20 fairness: {} of the first {} arrivals got a unit; {} inversions, {} buyers passed over\n\
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
            self.first_answer_ms.p50,
            self.first_answer_ms.p99,
            self.first_answer_ms.max,
            self.final_answer_ms.p50,
            self.final_answer_ms.p99,
            self.final_answer_ms.max,
            seconds(self.sold_out_after_s),
            seconds(self.all_decided_after_s),
            self.line.waited,
            self.line.served,
            self.line.wait_ms.p50,
            self.line.wait_ms.p99,
            self.line.wait_ms.max,
            self.fairness.winners_among_first,
            self.stock.min(self.buyers),
            self.fairness.inversions,
            self.fairness.passed_over,
            if self.audit_ok { "clean" } else { "VIOLATIONS" },
        );
        for violation in &self.violations {
            out.push_str(&format!("  - {violation}\n"));
        }
        for checked in &self.thresholds {
            let actual = checked
                .actual
                .map_or_else(|| "none".to_owned(), |a| format!("{a}"));
            let mark = if checked.held { "ok  " } else { "FAIL" };
            out.push_str(&format!(
                "threshold {mark} {} (was {actual})\n",
                checked.threshold
            ));
        }
        out.push_str(&format!("verdict: {verdict}\n"));
        out
    }
}

fn seconds(s: Option<f64>) -> String {
    s.map_or_else(|| "never".to_owned(), |s| format!("{s:.2} s"))
}

enum Answer {
    Accepted { id: RequestId, due_unix_ms: u64 },
    SoldOut,
    RateLimited,
    Overloaded,
    Invalid,
    Error,
}

/// What one buyer sends, every time it asks.
struct Purchase {
    key: String,
    body: String,
    /// `Bearer <token>`, for a gateway that verifies tokens.
    authorization: Option<String>,
}

/// One POST of a buyer: its answer, and the `Retry-After` it was given (1 s
/// when the gateway gave none).
async fn ask(
    http: &reqwest::Client,
    url: &reqwest::Url,
    connections: &Semaphore,
    purchase: &Purchase,
    due_unix_ms: u64,
    sent: &mut Option<Instant>,
) -> (Answer, Option<Duration>) {
    // A connection is held for the request only, not while waiting to retry.
    let Ok(_permit) = connections.acquire().await else {
        return (Answer::Error, None);
    };
    sent.get_or_insert_with(Instant::now);
    // Built once per buyer: the generator shares the machine with what it
    // measures, so every microsecond it spends is one the gateway lacks.
    let mut request = http
        .post(url.clone())
        .header("Idempotency-Key", &purchase.key)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(purchase.body.clone());
    if let Some(authorization) = &purchase.authorization {
        request = request.header(reqwest::header::AUTHORIZATION, authorization);
    }
    let response = match request.send().await {
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
        status => {
            // Read to its end, or the connection is closed instead of going
            // back to the pool, and every refusal costs both sides a new one.
            let _ = response.bytes().await;
            match status {
                409 => Answer::SoldOut,
                429 => Answer::RateLimited,
                503 => Answer::Overloaded,
                400..=499 => Answer::Invalid,
                _ => Answer::Error,
            }
        }
    };
    (answer, Some(wait))
}

#[derive(Deserialize)]
struct AcceptedBody {
    request_id: String,
}

#[allow(
    clippy::expect_used,
    reason = "constant bounds within hdrhistogram's limits; every surge test builds one"
)]
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
            starts_in: options.opens_in,
            duration: Duration::from_secs(3600),
            overbook: options.overbook,
        },
    )
    .await?;

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(options.connections)
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = reqwest::Url::parse(&format!(
        "{}/v1/purchases",
        options.gateway_url.trim_end_matches('/')
    ))?;
    let run_id = &uuid::Uuid::now_v7().simple().to_string()[..12];
    let connections = Arc::new(Semaphore::new(options.connections.max(1)));
    let user = |i: u64| format!("surge-{run_id}-{i}");
    let offsets = options.arrival.offsets(options.buyers);
    let buyers = offsets.len() as u64;
    // Signed before the crowd starts: signing is the issuer's work, not the
    // gateway's, and must not delay arrivals.
    let mut authorizations = match &options.tokens {
        Some(signer) => (0..buyers)
            .map(|i| Ok(Some(format!("Bearer {}", signer.sign(&user(i))?))))
            .collect::<anyhow::Result<Vec<_>>>()?,
        None => vec![None; offsets.len()],
    }
    .into_iter();
    // A short lead so spawning the crowd does not eat into the first arrivals.
    let lead = Duration::from_millis(100);
    let start = Instant::now() + lead;
    let start_unix_ms = clock::now_ms() + lead.as_millis() as u64;

    let mut tasks = Vec::with_capacity(offsets.len());
    for (i, offset) in (0..buyers).zip(offsets.iter().copied()) {
        let (http, url, connections) = (http.clone(), url.clone(), connections.clone());
        let purchase = Purchase {
            key: user(i),
            body: serde_json::json!({
                "sku": options.sku.as_str(),
                "user_id": user(i),
                "quantity": 1,
            })
            .to_string(),
            authorization: authorizations.next().flatten(),
        };
        let max_retries = options.max_retries;
        tasks.push(tokio::spawn(async move {
            let due = start + offset;
            tokio::time::sleep_until(due).await;
            let due_unix_ms = start_unix_ms + offset.as_millis() as u64;
            let mut retries = 0u32;
            let mut sent = None;
            let mut first_answer = None;
            let answer = loop {
                let asked = ask(&http, &url, &connections, &purchase, due_unix_ms, &mut sent).await;
                first_answer.get_or_insert_with(|| due.elapsed());
                match asked {
                    (Answer::RateLimited | Answer::Overloaded, Some(wait))
                        if retries < max_retries =>
                    {
                        retries += 1;
                        tokio::time::sleep(wait).await;
                    }
                    (answer, _) => break answer,
                }
            };
            Buyer {
                index: i,
                answer,
                retries,
                first_answer: first_answer.unwrap_or_default(),
                last_answer: due.elapsed(),
                answered_at: Instant::now(),
                sent: sent.unwrap_or(due),
            }
        }));
    }

    let mut accept_latency = histogram();
    let mut first_answer = histogram();
    let mut final_answer = histogram();
    let mut shed = Shed::default();
    let mut errors = 0;
    let mut retries = 0u64;
    let mut accepted = Vec::new();
    let mut last_answer = start;
    // (sent, buyer index, accepted purchase) of every buyer.
    let mut fates: Vec<(Instant, u64, Option<RequestId>)> = Vec::new();
    let mut timeline = Timeline::default();
    for offset in &offsets {
        timeline.at(offset.as_secs()).due += 1;
    }
    for task in tasks {
        let buyer = task.await?;
        timeline.answered(
            buyer.answered_at.saturating_duration_since(start).as_secs(),
            &buyer.answer,
            micros(buyer.last_answer),
        );
        retries += u64::from(buyer.retries);
        let _ = accept_latency.record(micros(buyer.last_answer));
        let _ = first_answer.record(micros(buyer.first_answer));
        last_answer = last_answer.max(buyer.answered_at);
        let mut accepted_id = None;
        match buyer.answer {
            Answer::Accepted { id, due_unix_ms } => {
                accepted.push((id, due_unix_ms));
                accepted_id = Some(id);
            }
            Answer::SoldOut => shed.sold_out += 1,
            Answer::RateLimited => shed.rate_limited += 1,
            Answer::Overloaded => shed.overloaded += 1,
            Answer::Invalid => shed.invalid += 1,
            Answer::Error => errors += 1,
        }
        if accepted_id.is_none() {
            // A refusal they keep is their final answer.
            let _ = final_answer.record(micros(buyer.last_answer));
        }
        fates.push((buyer.sent, buyer.index, accepted_id));
    }
    let send_phase = last_answer
        .saturating_duration_since(start)
        .as_secs_f64()
        .max(1e-3);

    let settled = settle(stores, &accepted, options.settle_timeout).await?;
    let mut decision_latency = histogram();
    let mut line_wait = histogram();
    let mut line = LineReport::default();
    let (mut confirmed, mut cancelled, mut rejected) = (0, 0, 0);
    let (mut last_decided, mut last_confirmed) = (start_unix_ms, start_unix_ms);
    let mut won = std::collections::HashSet::new();
    for settled in &settled {
        let took = settled
            .decided_ms
            .saturating_sub(settled.due_unix_ms)
            .max(1)
            * 1000;
        let _ = decision_latency.record(took);
        let second = timeline.at(settled.decided_ms.saturating_sub(start_unix_ms) / 1000);
        second.decided += 1;
        second.confirmed += u64::from(settled.state == PurchaseState::Confirmed);
        let _ = final_answer.record(took);
        last_decided = last_decided.max(settled.decided_ms);
        match settled.state {
            PurchaseState::Confirmed => {
                confirmed += 1;
                last_confirmed = last_confirmed.max(settled.decided_ms);
                won.insert(settled.id);
            }
            PurchaseState::Cancelled => {
                cancelled += 1;
                won.insert(settled.id);
            }
            _ => rejected += 1,
        }
        if let Some(since) = settled.waiting_since_ms {
            line.waited += 1;
            if settled.state != PurchaseState::Rejected {
                line.served += 1;
            }
            let _ = line_wait.record(settled.decided_ms.saturating_sub(since).max(1) * 1000);
        }
    }
    line.wait_ms = latency(&line_wait);
    let unsettled = (accepted.len() - settled.len()) as u64;
    fates.sort_by_key(|(sent, index, _)| (*sent, *index));
    let fairness = fairness(
        &fates
            .iter()
            .map(|(_, _, id)| id.is_some_and(|id| won.contains(&id)))
            .collect::<Vec<_>>(),
        options.stock,
    );
    let after_s = |unix_ms: u64| unix_ms.saturating_sub(start_unix_ms) as f64 / 1000.0;

    let report = stores.audit(&options.sku, unsettled == 0).await?;
    let sold_out = report.sold >= options.stock as i64 && confirmed > 0;
    let duration_s = start.elapsed().as_secs_f64();
    let mut surge = SurgeReport {
        buyers,
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
        first_answer_ms: latency(&first_answer),
        final_answer_ms: latency(&final_answer),
        sold_out_after_s: sold_out.then(|| after_s(last_confirmed)),
        all_decided_after_s: (unsettled == 0).then(|| after_s(last_decided)),
        line,
        fairness,
        retries,
        accept_rps: accepted.len() as f64 / send_phase,
        answered_rps: buyers as f64 / send_phase,
        duration_s,
        timeline: timeline.seconds(),
        thresholds: Vec::new(),
    };
    surge.thresholds = thresholds::check(&options.thresholds, &thresholds::figures(&surge));
    Ok(surge)
}

/// The timeline as it is filled in: a second for each second reached.
#[derive(Default)]
struct Timeline {
    seconds: Vec<Second>,
    accept: Vec<Histogram<u64>>,
}

impl Timeline {
    fn at(&mut self, t: u64) -> &mut Second {
        // A surge of hours is not what this is for; a wild clock must not
        // allocate the machine away either.
        let t = t.min(24 * 3600) as usize;
        while self.seconds.len() <= t {
            self.seconds.push(Second {
                t: self.seconds.len() as u64,
                ..Second::default()
            });
            self.accept.push(histogram());
        }
        &mut self.seconds[t]
    }

    fn answered(&mut self, t: u64, answer: &Answer, latency_us: u64) {
        let second = self.at(t);
        second.answered += 1;
        match answer {
            Answer::Accepted { .. } => second.accepted += 1,
            Answer::Error => second.errors += 1,
            _ => second.shed += 1,
        }
        let t = second.t as usize;
        let _ = self.accept[t].record(latency_us);
    }

    fn seconds(mut self) -> Vec<Second> {
        for (second, accept) in self.seconds.iter_mut().zip(&self.accept) {
            second.accept_ms = latency(accept);
        }
        self.seconds
    }
}

struct Buyer {
    index: u64,
    answer: Answer,
    retries: u32,
    first_answer: Duration,
    last_answer: Duration,
    answered_at: Instant,
    /// When their first request left (after waiting for a connection).
    sent: Instant,
}

fn micros(d: Duration) -> u64 {
    d.as_micros().max(1) as u64
}

/// `won[i]`: whether the i-th arrival got a unit.
fn fairness(won: &[bool], stock: u64) -> Fairness {
    let mut report = Fairness {
        winners: won.iter().filter(|w| **w).count() as u64,
        winners_among_first: won.iter().take(stock as usize).filter(|w| **w).count() as u64,
        ..Fairness::default()
    };
    // From the last arrival back: every buyer who got nothing is passed
    // over by each winner who arrived after them.
    let mut later_winners = 0u64;
    for won in won.iter().rev() {
        if *won {
            later_winners += 1;
        } else if later_winners > 0 {
            report.inversions += later_winners;
            report.passed_over += 1;
        }
    }
    report
}

struct Settled {
    id: RequestId,
    due_unix_ms: u64,
    state: PurchaseState,
    decided_ms: u64,
    waiting_since_ms: Option<u64>,
}

/// Waits until every accepted purchase is terminal, or the timeout.
/// Returns those that are.
async fn settle(
    stores: &Stores,
    accepted: &[(RequestId, u64)],
    timeout: Duration,
) -> anyhow::Result<Vec<Settled>> {
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
                    Some(s) if s.status.is_terminal() => done.push(Settled {
                        id: *id,
                        due_unix_ms: *due,
                        state: s.status,
                        decided_ms: s.updated_at_ms,
                        waiting_since_ms: s.waiting_since_ms,
                    }),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fairness_counts_who_was_passed_over() {
        // Arrivals in order: won, lost, won, lost, lost, won.
        let report = fairness(&[true, false, true, false, false, true], 2);
        assert_eq!(
            report,
            Fairness {
                winners: 3,
                winners_among_first: 1,
                // The 2nd is passed by the 3rd and 6th; the 4th and 5th by the 6th.
                inversions: 4,
                passed_over: 3,
            }
        );
        assert_eq!(fairness(&[true, true, false], 2).inversions, 0);
    }
}
