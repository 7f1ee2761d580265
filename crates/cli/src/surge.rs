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
use flashsale_core::status::{PurchaseState, reason};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::Stores;
pub use crate::crowd::Arrival;
pub use crate::histogram::Latency;
use crate::histogram::{self, encode, latency};
use crate::progress::{self, Counts};
use crate::sale::{self, SaleSpec};
use crate::sampler::{self, Samples};
use crate::thresholds::{self, Checked, Threshold};

#[derive(Debug, Clone)]
pub struct SurgeOptions {
    pub gateway_url: String,
    /// The skus on sale, each with its stock and popularity.
    pub skus: Vec<SkuPlan>,
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
    /// Send only this generator's share of the crowd (`--shard i/n`): the
    /// buyers whose index is `i` modulo `n`, whole, so that a buyer's
    /// retries and limits stay with one generator. The sales must exist:
    /// a shard never creates or resets them.
    pub shard: Option<Shard>,
    /// When the first buyer is due (unix ms), so that generators on
    /// several machines send one crowd; `None`: right away.
    pub start_at_unix_ms: Option<u64>,
    /// Where to read the consumer groups' lag from while the surge runs,
    /// for the report's plots; `None`: not sampled.
    pub lag_from: Option<flashsale_core::service::settings::KafkaSettings>,
    /// Show the surge's progress on stderr while it runs.
    pub progress: bool,
    /// How buyers behave beyond their first purchase (`Behaviour`).
    pub behaviour: Behaviour,
}

/// The shares of the crowd that behave one way or another, each buyer
/// drawn by its index (the same buyers every run).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Behaviour {
    /// Buyers who, answered `429` or `503`, wait the `Retry-After` and ask
    /// again (up to `max_retries` times); the others give up at once.
    pub retry_share: f64,
    /// Accepted buyers who then watch their purchase as a shop's page
    /// would: `GET /v1/purchases/{id}?wait=` until it is terminal.
    pub poll_share: f64,
    /// Accepted buyers who then try to buy the same sku again (a new
    /// purchase, a new key): what the per-user limit is for.
    pub twice_share: f64,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            retry_share: 1.0,
            poll_share: 0.0,
            twice_share: 0.0,
        }
    }
}

/// How the buyers with a behaviour fared.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BehaviourReport {
    /// Buyers who gave up at a `429` or `503` they could have retried.
    pub gave_up: u64,
    /// Buyers who watched their purchase, the long-polls they sent, how
    /// many saw it terminal, and when (from their intended send).
    pub pollers: u64,
    pub polls: u64,
    pub polls_saw_terminal: u64,
    pub poll_terminal_ms: Latency,
    /// Its histogram, encoded (`histogram::encode`).
    #[serde(default)]
    pub poll_terminal_histogram: String,
    /// Buyers who tried a second time, how many of those were accepted,
    /// and how many of those got a unit too (reserved, then confirmed or
    /// cancelled).
    pub second_tries: u64,
    pub second_accepted: u64,
    pub second_got_a_unit: u64,
    /// Buyers confirmed more units than the per-user limit (should be 0).
    pub over_limit: u64,
}

impl SurgeOptions {
    /// A surge of `skus` arriving as `arrival`, with the command's defaults
    /// for the rest: one unit each, at most 20,000 buyers, overbook 1.5,
    /// no declines, 5 ms payments, 64 connections, no retries, two
    /// minutes to settle, buyers named in the body, no thresholds, alone.
    pub fn new(gateway_url: String, skus: Vec<SkuPlan>, arrival: Arrival) -> Self {
        Self {
            gateway_url,
            skus,
            buyers: 20_000,
            arrival,
            opens_in: Duration::ZERO,
            per_user_limit: 1,
            overbook: 1.5,
            payment_decline_rate: 0.0,
            payment_latency_ms: 5,
            connections: 64,
            max_retries: 0,
            settle_timeout: Duration::from_secs(120),
            tokens: None,
            thresholds: Vec::new(),
            shard: None,
            start_at_unix_ms: None,
            lag_from: None,
            progress: false,
            behaviour: Behaviour::default(),
        }
    }
}

/// The `index`-th of `of` generators sending one crowd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u64,
    pub of: u64,
}

impl Shard {
    /// `i/n`, with `i` below `n`.
    pub fn parse(raw: &str) -> Option<Self> {
        let (index, of) = raw.split_once('/')?;
        let (index, of) = (index.trim().parse().ok()?, of.trim().parse().ok()?);
        (index < of).then_some(Self { index, of })
    }

    fn sends(&self, buyer: u64) -> bool {
        buyer % self.of == self.index
    }
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
    /// earlier one was refused for lack of stock (answered `409 sold-out`,
    /// or rejected `sold_out`), without ever holding one. A buyer refused
    /// by a rate limit, their own per-user limit or a stale wait is not
    /// passed over; one who declined payment held a unit.
    pub inversions: u64,
    /// Buyers refused for lack of stock while someone who arrived after
    /// them got a unit.
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
    /// Each sku's part of the surge (the totals above add them up).
    #[serde(default)]
    pub skus: Vec<SkuReport>,
    /// Each sku's stock and the groups' lag, sampled while it ran.
    #[serde(default)]
    pub samples: Samples,
    /// How the buyers with a behaviour (`--retry-share`, `--poll-share`,
    /// `--twice-share`) fared.
    #[serde(default)]
    pub behaviour: BehaviourReport,
    #[serde(default)]
    pub histograms: Histograms,
    /// How each `--threshold` fared.
    #[serde(default)]
    pub thresholds: Vec<Checked>,
}

/// A report's latency histograms, encoded (`histogram::encode`), so that
/// `flashsale report merge` adds them up exactly.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Histograms {
    pub accept: String,
    pub first_answer: String,
    pub final_answer: String,
    pub decision: String,
    pub line_wait: String,
}

/// One sku's part of a surge: its buyers, their answers and outcomes, its
/// audit, and how fair it was to its own crowd.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SkuReport {
    pub sku: String,
    pub stock: u64,
    pub buyers: u64,
    pub accepted: u64,
    pub shed: Shed,
    pub errors: u64,
    pub confirmed: u64,
    pub cancelled: u64,
    pub rejected: u64,
    pub unsettled: u64,
    pub units_sold: i64,
    pub oversold: i64,
    pub audit_ok: bool,
    pub accept_latency_ms: Latency,
    pub decision_latency_ms: Latency,
    pub final_answer_ms: Latency,
    pub sold_out_after_s: Option<f64>,
    pub all_decided_after_s: Option<f64>,
    pub line: LineReport,
    pub fairness: Fairness,
    #[serde(default)]
    pub histograms: Histograms,
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
    /// Its histogram, encoded.
    #[serde(default)]
    pub accept_histogram: String,
}

impl SurgeReport {
    /// A verdict a person can read at a glance.
    /// The surge's verdict: every purchase settled, no error, a clean audit.
    pub fn passed(&self) -> bool {
        self.audit_ok && self.unsettled == 0 && self.errors == 0
    }

    /// A line per sku, so that a small sale held up behind a big one shows.
    fn per_sku_table(&self) -> String {
        let mut out = format!(
            "  {:<24} {:>7} {:>8} {:>8} {:>7} {:>10} {:>10} {:>12} {:>10}\n",
            "sku",
            "stock",
            "buyers",
            "accepted",
            "sold",
            "accept p99",
            "decide p99",
            "all decided",
            "fairness"
        );
        for sku in &self.skus {
            out.push_str(&format!(
                "  {:<24} {:>7} {:>8} {:>8} {:>7} {:>7.1} ms {:>7.0} ms {:>12} {:>5}/{:<4}\n",
                sku.sku,
                sku.stock,
                sku.buyers,
                sku.accepted,
                sku.units_sold,
                sku.accept_latency_ms.p99,
                sku.decision_latency_ms.p99,
                seconds(sku.all_decided_after_s),
                sku.fairness.winners_among_first,
                sku.stock.min(sku.buyers),
            ));
        }
        out
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
        let b = &self.behaviour;
        if b.gave_up + b.pollers + b.second_tries > 0 {
            out.push_str(&format!(
                "  behaviour: {} gave up at a 429/503; {} watched their purchase ({} long-polls, \
                 {} saw it end, p99 {:.0} ms); {} tried twice ({} accepted, {} got a unit too); \
                 over the per-user limit: {}\n",
                b.gave_up,
                b.pollers,
                b.polls,
                b.polls_saw_terminal,
                b.poll_terminal_ms.p99,
                b.second_tries,
                b.second_accepted,
                b.second_got_a_unit,
                b.over_limit,
            ));
        }
        if self.skus.len() > 1 {
            out.push_str(&self.per_sku_table());
        }
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
    /// The `Idempotency-Key`, if the buyer sends one.
    key: Option<String>,
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
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(purchase.body.clone());
    if let Some(key) = &purchase.key {
        request = request.header("Idempotency-Key", key);
    }
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

pub async fn run(stores: &Stores, options: &SurgeOptions) -> anyhow::Result<SurgeReport> {
    anyhow::ensure!(!options.skus.is_empty(), "a surge needs at least one sku");
    stores
        .payment
        .set_behaviour(&StubBehaviour::simple(
            options.payment_decline_rate,
            options.payment_latency_ms,
        ))
        .await?;
    for plan in &options.skus {
        if options.shard.is_some() {
            // Another generator may be selling already: never reset.
            anyhow::ensure!(
                stores.inventory.get(&plan.sku).await?.is_some(),
                "a shard sends to sales that exist: create {} first (flashsale sale create)",
                plan.sku
            );
            continue;
        }
        sale::create(
            stores,
            &SaleSpec {
                sku: plan.sku.clone(),
                stock: plan.stock,
                per_user_limit: options.per_user_limit,
                price_cents: 1999,
                reservation_ttl: Duration::from_secs(600),
                starts_in: options.opens_in,
                duration: Duration::from_secs(3600),
                overbook: options.overbook,
            },
        )
        .await?;
    }

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(options.connections)
        .timeout(Duration::from_secs(30))
        .build()?;
    let base = options.gateway_url.trim_end_matches('/').to_owned();
    let url = reqwest::Url::parse(&format!("{base}/v1/purchases"))?;
    let run_id = &uuid::Uuid::now_v7().simple().to_string()[..12];
    let connections = Arc::new(Semaphore::new(options.connections.max(1)));
    let visits = visits(options, run_id)?;
    let offsets: Vec<Duration> = visits.iter().map(|v| v.offset).collect();
    let buyers = visits.len() as u64;
    // Signed before the crowd starts: signing is the issuer's work, not the
    // gateway's, and must not delay arrivals.
    let mut authorizations = match &options.tokens {
        Some(signer) => visits
            .iter()
            .map(|v| Ok(Some(format!("Bearer {}", signer.sign(&v.user)?))))
            .collect::<anyhow::Result<Vec<_>>>()?,
        None => vec![None; visits.len()],
    }
    .into_iter();
    // A short lead so spawning the crowd does not eat into the first arrivals.
    let now_unix_ms = clock::now_ms();
    let start_unix_ms = options.start_at_unix_ms.unwrap_or(now_unix_ms + 100);
    anyhow::ensure!(
        start_unix_ms + 1000 >= now_unix_ms,
        "the surge was to start {} ms ago",
        now_unix_ms - start_unix_ms
    );
    let start = Instant::now() + Duration::from_millis(start_unix_ms.saturating_sub(now_unix_ms));
    let mine = |i: &u64| options.shard.is_none_or(|shard| shard.sends(*i));
    let counts = Arc::new(Counts::default());
    let stop_sampling = tokio_util::sync::CancellationToken::new();
    let showing = options.progress.then(|| {
        let mine = (0..buyers).filter(|i| mine(i)).count() as u64;
        progress::show(counts.clone(), mine, stop_sampling.clone())
    });
    let sampling = tokio::spawn(sampler::watch(
        stores.stock.clone(),
        options.skus.iter().map(|p| p.sku.clone()).collect(),
        options.lag_from.clone(),
        start,
        stop_sampling.clone(),
    ));

    let mut tasks = Vec::with_capacity(offsets.len());
    for (i, visit) in (0..buyers).zip(visits) {
        let authorization = authorizations.next().flatten();
        if !mine(&i) {
            continue;
        }
        let (http, url, connections) = (http.clone(), url.clone(), connections.clone());
        let (sku, offset, quantity) = (visit.sku, visit.offset, visit.quantity);
        let purchase = Purchase {
            body: serde_json::json!({
                "sku": options.skus[sku].sku.as_str(),
                "user_id": visit.user,
                "quantity": visit.quantity,
            })
            .to_string(),
            key: visit.key,
            authorization,
        };
        let behaviour = options.behaviour;
        let max_retries = if draw(i, RETRY_SALT) < behaviour.retry_share {
            options.max_retries
        } else {
            0
        };
        let polls = draw(i, POLL_SALT) < behaviour.poll_share;
        let again = (draw(i, TWICE_SALT) < behaviour.twice_share).then(|| Purchase {
            key: purchase.key.as_ref().map(|k| format!("{k}-again")),
            body: purchase.body.clone(),
            authorization: purchase.authorization.clone(),
        });
        let (poll_url, poll_wait) = (base.clone(), options.settle_timeout);
        let counts = counts.clone();
        tasks.push(tokio::spawn(async move {
            let due = start + offset;
            tokio::time::sleep_until(due).await;
            let due_unix_ms = start_unix_ms + offset.as_millis() as u64;
            let mut retries = 0u32;
            let mut sent = None;
            let mut first_answer = None;
            let answer = loop {
                let asked = ask(&http, &url, &connections, &purchase, due_unix_ms, &mut sent).await;
                if first_answer.is_none() {
                    Counts::bump(&counts.sent);
                }
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
            let (last_answer, answered_at) = (due.elapsed(), Instant::now());
            Counts::bump(&counts.answered);
            match answer {
                Answer::Accepted { .. } => Counts::bump(&counts.accepted),
                Answer::Error => {}
                _ => Counts::bump(&counts.shed),
            }
            let mut after = AfterAnswer {
                gave_up: max_retries == 0
                    && retries == 0
                    && matches!(answer, Answer::RateLimited | Answer::Overloaded),
                ..AfterAnswer::default()
            };
            if let Answer::Accepted { id, .. } = answer {
                if let Some(again) = &again {
                    let mut unused = None;
                    let (second, _) =
                        ask(&http, &url, &connections, again, due_unix_ms, &mut unused).await;
                    after.second = Some(second);
                }
                if polls {
                    let watched = watch(&http, &poll_url, id, poll_wait).await;
                    after.polls = Some(watched.0);
                    after.saw_terminal = watched.1.map(|_| due.elapsed());
                }
            }
            Buyer {
                index: i,
                sku,
                quantity,
                answer,
                retries,
                first_answer: first_answer.unwrap_or_default(),
                last_answer,
                answered_at,
                sent: sent.unwrap_or(due),
                after,
            }
        }));
    }

    let mut timeline = Timeline::default();
    for (i, offset) in (0..buyers).zip(&offsets) {
        if mine(&i) {
            timeline.at(offset.as_secs()).due += 1;
        }
    }
    let mut crowd = Vec::with_capacity(tasks.len());
    let mut seconds = std::collections::HashSet::new();
    let mut accepted = Vec::new();
    let mut last_answer = start;
    for task in tasks {
        let buyer = task.await?;
        timeline.answered(
            buyer.answered_at.saturating_duration_since(start).as_secs(),
            &buyer.answer,
            micros(buyer.last_answer),
        );
        last_answer = last_answer.max(buyer.answered_at);
        if let Answer::Accepted { id, due_unix_ms } = buyer.answer {
            accepted.push((id, due_unix_ms));
        }
        // A second purchase settles and is audited like any, but is told
        // apart: the crowd's figures are of first purchases.
        if let Some(Answer::Accepted { id, due_unix_ms }) = buyer.after.second {
            accepted.push((id, due_unix_ms));
            seconds.insert(id);
        }
        crowd.push(buyer);
    }
    let send_phase = last_answer
        .saturating_duration_since(start)
        .as_secs_f64()
        .max(1e-3);

    let settled: std::collections::HashMap<RequestId, Settled> =
        settle(stores, &accepted, options.settle_timeout, &counts)
            .await?
            .into_iter()
            .map(|s| (s.id, s))
            .collect();
    // A last look once everything settled, then the plots have their data.
    tokio::time::sleep(Duration::from_millis(600)).await;
    stop_sampling.cancel();
    let samples = sampling.await.unwrap_or_default();
    if let Some(showing) = showing {
        let _ = showing.await;
    }
    for s in settled.values().filter(|s| !seconds.contains(&s.id)) {
        let second = timeline.at(s.decided_ms.saturating_sub(start_unix_ms) / 1000);
        second.decided += 1;
        second.confirmed += u64::from(s.state == PurchaseState::Confirmed);
    }
    let mut total = Tally::new(start_unix_ms);
    let mut per_sku: Vec<Tally> = options
        .skus
        .iter()
        .map(|_| Tally::new(start_unix_ms))
        .collect();
    for buyer in &crowd {
        let outcome = match buyer.answer {
            Answer::Accepted { id, .. } => settled.get(&id),
            _ => None,
        };
        total.add(buyer, outcome);
        per_sku[buyer.sku].add(buyer, outcome);
    }

    let mut skus = Vec::with_capacity(options.skus.len());
    let (mut violations, mut audit_ok, mut units_sold) = (Vec::new(), true, 0i64);
    let mut fairness_total = Fairness::default();
    for (plan, tally) in options.skus.iter().zip(per_sku) {
        // Other generators may still be selling: at rest only alone.
        let at_rest = tally.unsettled == 0 && options.shard.is_none();
        let audit = stores.audit(&plan.sku, at_rest).await?;
        audit_ok &= audit.ok();
        units_sold += audit.sold;
        violations.extend(audit.violations.iter().map(|v| match options.skus.len() {
            1 => v.clone(),
            _ => format!("{}: {v}", plan.sku),
        }));
        let row = tally.report(&plan.sku, plan.stock, &audit);
        fairness_total.winners += row.fairness.winners;
        fairness_total.winners_among_first += row.fairness.winners_among_first;
        fairness_total.inversions += row.fairness.inversions;
        fairness_total.passed_over += row.fairness.passed_over;
        skus.push(row);
    }
    let stock: u64 = options.skus.iter().map(|p| p.stock).sum();
    let all_sold = skus.iter().all(|s| s.sold_out_after_s.is_some());
    let duration_s = start.elapsed().as_secs_f64();
    let after_s = |unix_ms: u64| unix_ms.saturating_sub(start_unix_ms) as f64 / 1000.0;
    let behaviour = behaviour_report(&crowd, &settled, options.per_user_limit);
    let mut surge = SurgeReport {
        behaviour,
        buyers: total.buyers,
        accepted: total.accepted,
        shed: total.shed.clone(),
        errors: total.errors,
        confirmed: total.confirmed,
        cancelled: total.cancelled,
        rejected: total.rejected,
        unsettled: total.unsettled,
        units_sold,
        stock,
        oversold: skus.iter().map(|s| s.oversold).sum(),
        audit_ok,
        violations,
        accept_latency_ms: latency(&total.accept),
        decision_latency_ms: latency(&total.decision),
        first_answer_ms: latency(&total.first),
        final_answer_ms: latency(&total.final_answer),
        sold_out_after_s: (all_sold && total.confirmed > 0).then(|| after_s(total.last_confirmed)),
        all_decided_after_s: (total.unsettled == 0).then(|| after_s(total.last_decided)),
        line: total.line(),
        fairness: fairness_total,
        retries: total.retries,
        accept_rps: total.accepted as f64 / send_phase,
        answered_rps: total.buyers as f64 / send_phase,
        duration_s,
        timeline: timeline.seconds(),
        skus,
        histograms: total.histograms(),
        samples,
        thresholds: Vec::new(),
    };
    surge.thresholds = thresholds::check(&options.thresholds, &thresholds::figures(&surge));
    Ok(surge)
}

/// One buyer of the crowd: when it is due, which sku it asks for, who it
/// is, how many units, and the `Idempotency-Key` it sends, if any.
struct Visit {
    offset: Duration,
    sku: usize,
    user: String,
    quantity: u32,
    key: Option<String>,
}

/// The crowd of a surge: made up (buyer i is `surge-<run>-i`, asks for
/// one unit of a sku drawn by popularity, with a key), or replayed from a
/// trace (its skus, buyers and quantities; a key of this run where the
/// recorded buyer sent one, so a replay is never answered from the
/// recording's purchases).
fn visits(options: &SurgeOptions, run_id: &str) -> anyhow::Result<Vec<Visit>> {
    let offsets = options.arrival.offsets(options.buyers);
    if let Arrival::Replay(replay) = &options.arrival {
        let index: std::collections::HashMap<&str, usize> = options
            .skus
            .iter()
            .enumerate()
            .map(|(i, plan)| (plan.sku.as_str(), i))
            .collect();
        return replay
            .lines
            .iter()
            .zip(offsets)
            .enumerate()
            .map(|(i, (line, offset))| {
                let sku = *index.get(line.sku.as_str()).ok_or_else(|| {
                    anyhow::anyhow!("the trace's sku {:?} is not one of the surge's", line.sku)
                })?;
                Ok(Visit {
                    offset,
                    sku,
                    user: line.user.clone(),
                    quantity: line.quantity,
                    key: line.keyed.then(|| format!("replay-{run_id}-{i}")),
                })
            })
            .collect();
    }
    let popularity = Popularity::new(options.skus.iter().map(|p| p.weight));
    Ok((0u64..)
        .zip(offsets)
        .map(|(i, offset)| {
            let user = format!("surge-{run_id}-{i}");
            Visit {
                offset,
                sku: popularity.pick(i),
                key: Some(user.clone()),
                user,
                quantity: 1,
            }
        })
        .collect())
}

/// A sku of the surge: its stock, and how popular it is (a share of the
/// crowd proportional to `weight`).
#[derive(Debug, Clone, PartialEq)]
pub struct SkuPlan {
    pub sku: Sku,
    pub stock: u64,
    pub weight: f64,
}

impl SkuPlan {
    /// The one sku of a single-sku surge.
    pub fn only(sku: Sku, stock: u64) -> Vec<Self> {
        vec![Self {
            sku,
            stock,
            weight: 1.0,
        }]
    }
}

impl SkuPlan {
    /// A sale's skus from a file: one per line, `<sku> <stock> <weight>`
    /// (the crowd's share is in proportion to the weight); blank lines and
    /// `#` comments are skipped.
    pub fn parse_file(text: &str) -> Result<Vec<Self>, String> {
        let plans = text
            .lines()
            .enumerate()
            .map(|(i, line)| (i + 1, line.split('#').next().unwrap_or_default().trim()))
            .filter(|(_, line)| !line.is_empty())
            .map(|(n, line)| {
                let bad = |why: &str| format!("line {n} ({line:?}): {why}");
                let fields: Vec<&str> = line.split_whitespace().collect();
                let [sku, stock, weight] = fields.as_slice() else {
                    return Err(bad("give `<sku> <stock> <weight>`"));
                };
                Ok(Self {
                    sku: Sku::parse(sku).map_err(|e| bad(&e.to_string()))?,
                    stock: stock
                        .parse()
                        .map_err(|_| bad("the stock is not a number of units"))?,
                    weight: weight
                        .parse::<f64>()
                        .ok()
                        .filter(|w| w.is_finite() && *w >= 0.0)
                        .ok_or_else(|| bad("the weight is not a number, 0 or more"))?,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if plans.iter().all(|p| p.weight == 0.0) {
            return Err("no sku has a weight above 0: the crowd would ask for none".into());
        }
        Ok(plans)
    }
}

/// Zipf weights for `n` skus: the k-th most popular draws `1 / k^s` of
/// the crowd (s = 0: all alike; s = 1: the first twice the second).
pub fn zipf(n: usize, s: f64) -> Vec<f64> {
    (1..=n).map(|k| 1.0 / (k as f64).powf(s)).collect()
}

/// Which sku each buyer asks for: drawn from the weights by the buyer's
/// index, so the same crowd asks for the same skus every run.
struct Popularity {
    cumulative: Vec<f64>,
}

impl Popularity {
    fn new(weights: impl Iterator<Item = f64>) -> Self {
        let mut sum = 0.0;
        let cumulative = weights
            .map(|w| {
                sum += w.max(0.0);
                sum
            })
            .collect();
        Self { cumulative }
    }

    fn pick(&self, buyer: u64) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        if self.cumulative.len() <= 1 || total <= 0.0 {
            return 0;
        }
        let draw = draw(buyer, 0) * total;
        self.cumulative
            .partition_point(|c| *c <= draw)
            .min(self.cumulative.len() - 1)
    }
}

/// A sku's part of a surge (or the whole crowd's), counted buyer by buyer.
struct Tally {
    start_unix_ms: u64,
    buyers: u64,
    accepted: u64,
    retries: u64,
    shed: Shed,
    errors: u64,
    confirmed: u64,
    cancelled: u64,
    rejected: u64,
    unsettled: u64,
    accept: Histogram<u64>,
    first: Histogram<u64>,
    final_answer: Histogram<u64>,
    decision: Histogram<u64>,
    line_wait: Histogram<u64>,
    waited: u64,
    served: u64,
    last_decided: u64,
    last_confirmed: u64,
    /// (first request sent, buyer index, got a unit) of every buyer.
    fates: Vec<(Instant, u64, Fate)>,
}

impl Tally {
    fn new(start_unix_ms: u64) -> Self {
        Self {
            start_unix_ms,
            buyers: 0,
            accepted: 0,
            retries: 0,
            shed: Shed::default(),
            errors: 0,
            confirmed: 0,
            cancelled: 0,
            rejected: 0,
            unsettled: 0,
            accept: histogram::new(),
            first: histogram::new(),
            final_answer: histogram::new(),
            decision: histogram::new(),
            line_wait: histogram::new(),
            waited: 0,
            served: 0,
            last_decided: start_unix_ms,
            last_confirmed: start_unix_ms,
            fates: Vec::new(),
        }
    }

    fn add(&mut self, buyer: &Buyer, settled: Option<&Settled>) {
        self.buyers += 1;
        self.retries += u64::from(buyer.retries);
        let _ = self.accept.record(micros(buyer.last_answer));
        let _ = self.first.record(micros(buyer.first_answer));
        match buyer.answer {
            Answer::Accepted { .. } => self.accepted += 1,
            Answer::SoldOut => self.shed.sold_out += 1,
            Answer::RateLimited => self.shed.rate_limited += 1,
            Answer::Overloaded => self.shed.overloaded += 1,
            Answer::Invalid => self.shed.invalid += 1,
            Answer::Error => self.errors += 1,
        }
        let mut fate = match buyer.answer {
            Answer::SoldOut => Fate::OutOfStock,
            _ => Fate::Other,
        };
        match (&buyer.answer, settled) {
            // A refusal they keep is their final answer.
            (Answer::Accepted { .. }, None) => self.unsettled += 1,
            (_, None) => {
                let _ = self.final_answer.record(micros(buyer.last_answer));
            }
            (_, Some(settled)) => {
                let took = settled
                    .decided_ms
                    .saturating_sub(settled.due_unix_ms)
                    .max(1)
                    * 1000;
                let _ = self.decision.record(took);
                let _ = self.final_answer.record(took);
                self.last_decided = self.last_decided.max(settled.decided_ms);
                match settled.state {
                    PurchaseState::Confirmed => {
                        self.confirmed += 1;
                        self.last_confirmed = self.last_confirmed.max(settled.decided_ms);
                        fate = Fate::Won;
                    }
                    PurchaseState::Cancelled => {
                        self.cancelled += 1;
                        fate = Fate::Won;
                    }
                    _ => {
                        self.rejected += 1;
                        if settled.reason.as_deref() == Some(reason::SOLD_OUT) {
                            fate = Fate::OutOfStock;
                        }
                    }
                }
                if let Some(since) = settled.waiting_since_ms {
                    self.waited += 1;
                    self.served += u64::from(settled.state != PurchaseState::Rejected);
                    let waited = settled.decided_ms.saturating_sub(since).max(1) * 1000;
                    let _ = self.line_wait.record(waited);
                }
            }
        }
        self.fates.push((buyer.sent, buyer.index, fate));
    }

    fn histograms(&self) -> Histograms {
        Histograms {
            accept: encode(&self.accept),
            first_answer: encode(&self.first),
            final_answer: encode(&self.final_answer),
            decision: encode(&self.decision),
            line_wait: encode(&self.line_wait),
        }
    }

    fn line(&self) -> LineReport {
        LineReport {
            waited: self.waited,
            served: self.served,
            wait_ms: latency(&self.line_wait),
        }
    }

    /// The sku's row of the report; `audit` is its audit at rest.
    fn report(mut self, sku: &Sku, stock: u64, audit: &crate::audit::Report) -> SkuReport {
        self.fates.sort_by_key(|(sent, index, _)| (*sent, *index));
        let fates: Vec<Fate> = self.fates.iter().map(|(_, _, fate)| *fate).collect();
        let after_s = |unix_ms: u64| unix_ms.saturating_sub(self.start_unix_ms) as f64 / 1000.0;
        SkuReport {
            sku: sku.to_string(),
            stock,
            buyers: self.buyers,
            accepted: self.accepted,
            shed: self.shed.clone(),
            errors: self.errors,
            confirmed: self.confirmed,
            cancelled: self.cancelled,
            rejected: self.rejected,
            unsettled: self.unsettled,
            units_sold: audit.sold,
            oversold: (audit.sold - stock as i64).max(0),
            audit_ok: audit.ok(),
            accept_latency_ms: latency(&self.accept),
            decision_latency_ms: latency(&self.decision),
            final_answer_ms: latency(&self.final_answer),
            sold_out_after_s: (audit.sold >= stock as i64 && self.confirmed > 0)
                .then(|| after_s(self.last_confirmed)),
            all_decided_after_s: (self.unsettled == 0).then(|| after_s(self.last_decided)),
            line: self.line(),
            fairness: fairness(&fates, stock),
            histograms: self.histograms(),
        }
    }
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
            self.accept.push(histogram::new());
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
            second.accept_histogram = encode(accept);
        }
        self.seconds
    }
}

struct Buyer {
    index: u64,
    /// Which of the surge's skus it asks for, and how many units.
    sku: usize,
    quantity: u32,
    answer: Answer,
    retries: u32,
    first_answer: Duration,
    last_answer: Duration,
    answered_at: Instant,
    /// When their first request left (after waiting for a connection).
    sent: Instant,
    after: AfterAnswer,
}

/// How the buyers with a behaviour fared, once their purchases settled.
fn behaviour_report(
    crowd: &[Buyer],
    settled: &std::collections::HashMap<RequestId, Settled>,
    per_user_limit: u64,
) -> BehaviourReport {
    let mut report = BehaviourReport::default();
    let mut seen = histogram::new();
    let state = |answer: &Answer| match answer {
        Answer::Accepted { id, .. } => settled.get(id).map(|s| s.state),
        _ => None,
    };
    let held = |s: Option<PurchaseState>| {
        matches!(s, Some(PurchaseState::Confirmed | PurchaseState::Cancelled))
    };
    for buyer in crowd {
        let after = &buyer.after;
        report.gave_up += u64::from(after.gave_up);
        if let Some(polls) = after.polls {
            report.pollers += 1;
            report.polls += u64::from(polls);
        }
        if let Some(at) = after.saw_terminal {
            report.polls_saw_terminal += 1;
            let _ = seen.record(micros(at));
        }
        let Some(second) = &after.second else {
            continue;
        };
        report.second_tries += 1;
        report.second_accepted += u64::from(matches!(second, Answer::Accepted { .. }));
        report.second_got_a_unit += u64::from(held(state(second)));
        let confirmed = [state(&buyer.answer), state(second)]
            .iter()
            .filter(|s| **s == Some(PurchaseState::Confirmed))
            .count() as u64
            * u64::from(buyer.quantity);
        report.over_limit += u64::from(confirmed > per_user_limit);
    }
    report.poll_terminal_ms = latency(&seen);
    report.poll_terminal_histogram = encode(&seen);
    report
}

/// What a buyer with a behaviour did after its first purchase's answer.
#[derive(Default)]
struct AfterAnswer {
    /// Refused with a `429` or `503` it did not retry.
    gave_up: bool,
    /// Its second purchase's answer.
    second: Option<Answer>,
    /// Long-polls sent while watching its purchase.
    polls: Option<u32>,
    /// When (from its intended send) a poll showed the purchase terminal.
    saw_terminal: Option<Duration>,
}

const RETRY_SALT: u64 = 0x5EED_0001;
const POLL_SALT: u64 = 0x5EED_0002;
const TWICE_SALT: u64 = 0x5EED_0003;

/// A buyer's fixed draw in [0, 1) for one question (`salt`): SplitMix64 of
/// its index, so the same buyers behave the same way every run.
fn draw(buyer: u64, salt: u64) -> f64 {
    let mut z = buyer
        .wrapping_add(1)
        .wrapping_add(salt)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// Long-polls a purchase until it is terminal or `wait` has passed, as a
/// shop's page would: the polls sent, and the terminal state if seen.
async fn watch(
    http: &reqwest::Client,
    base: &str,
    id: RequestId,
    wait: Duration,
) -> (u32, Option<PurchaseState>) {
    let deadline = Instant::now() + wait;
    let url = format!("{base}/v1/purchases/{id}?wait=30");
    let mut polls = 0;
    while Instant::now() < deadline {
        polls += 1;
        let status = match http.get(&url).send().await {
            Ok(response) if response.status().is_success() => {
                response.json::<StatusBody>().await.ok().map(|b| b.status)
            }
            // Refused (a 429 for too many long-polls) or unreachable: a
            // page asks again a moment later.
            _ => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                None
            }
        };
        if let Some(state) = status.filter(|s| s.is_terminal()) {
            return (polls, Some(state));
        }
    }
    (polls, None)
}

#[derive(Deserialize)]
struct StatusBody {
    status: PurchaseState,
}

fn micros(d: Duration) -> u64 {
    d.as_micros().max(1) as u64
}

/// How a buyer's first purchase ended, for fairness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Held a unit: confirmed, or cancelled after a decline or an expiry.
    Won,
    /// Refused for lack of stock, never holding one.
    OutOfStock,
    /// Anything else: a rate limit, the per-user limit, a stale wait, an
    /// error, not settled.
    Other,
}

/// `fates[i]`: how the i-th arrival fared.
fn fairness(fates: &[Fate], stock: u64) -> Fairness {
    let won = |f: &&Fate| **f == Fate::Won;
    let mut report = Fairness {
        winners: fates.iter().filter(won).count() as u64,
        winners_among_first: fates.iter().take(stock as usize).filter(won).count() as u64,
        ..Fairness::default()
    };
    // From the last arrival back: every buyer refused for lack of stock is
    // passed over by each winner who arrived after them.
    let mut later_winners = 0u64;
    for fate in fates.iter().rev() {
        match fate {
            Fate::Won => later_winners += 1,
            Fate::OutOfStock if later_winners > 0 => {
                report.inversions += later_winners;
                report.passed_over += 1;
            }
            _ => {}
        }
    }
    report
}

struct Settled {
    id: RequestId,
    due_unix_ms: u64,
    state: PurchaseState,
    reason: Option<String>,
    decided_ms: u64,
    waiting_since_ms: Option<u64>,
}

/// Waits until every accepted purchase is terminal, or the timeout.
/// Returns those that are.
async fn settle(
    stores: &Stores,
    accepted: &[(RequestId, u64)],
    timeout: Duration,
    counts: &Counts,
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
                    Some(s) if s.status.is_terminal() => {
                        Counts::bump(&counts.decided);
                        done.push(Settled {
                            id: *id,
                            due_unix_ms: *due,
                            state: s.status,
                            reason: s.reason.clone(),
                            decided_ms: s.updated_at_ms,
                            waiting_since_ms: s.waiting_since_ms,
                        });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crowd_spreads_over_skus_as_zipf_says_the_same_way_every_run() {
        let weights = zipf(3, 1.0);
        assert_eq!(weights, [1.0, 0.5, 1.0 / 3.0]);
        let popularity = Popularity::new(weights.iter().copied());
        let mut counts = [0u64; 3];
        for buyer in 0..60_000 {
            counts[popularity.pick(buyer)] += 1;
        }
        // Shares 6/11, 3/11, 2/11.
        for (got, share) in counts.iter().zip([6.0, 3.0, 2.0]) {
            let want = 60_000.0 * share / 11.0;
            assert!((*got as f64 - want).abs() < want * 0.03, "{counts:?}");
        }
        let again: Vec<usize> = (0..100).map(|b| popularity.pick(b)).collect();
        assert_eq!(
            again,
            (0..100).map(|b| popularity.pick(b)).collect::<Vec<_>>()
        );
        let one = Popularity::new([1.0].into_iter());
        assert!((0..100).all(|b| one.pick(b) == 0));
    }

    #[test]
    fn skus_come_from_a_file_with_their_stock_and_weight() {
        let plans =
            SkuPlan::parse_file("# sale of the day\ntv 1000 5\n\nmug 50 1  # a small one\n")
                .expect("valid");
        assert_eq!(plans.len(), 2);
        assert_eq!(
            (plans[1].sku.as_str(), plans[1].stock, plans[1].weight),
            ("mug", 50, 1.0)
        );
        assert!(
            SkuPlan::parse_file("tv 1000")
                .expect_err("no weight")
                .contains("line 1")
        );
        assert!(SkuPlan::parse_file("tv lots 1").is_err());
        assert!(SkuPlan::parse_file("tv 10 0").is_err(), "nobody would ask");
    }

    #[test]
    fn fairness_counts_who_was_passed_over_for_lack_of_stock_only() {
        use Fate::{Other, OutOfStock, Won};
        // Arrivals in order: won, out of stock, won, out of stock, limited, won.
        let report = fairness(&[Won, OutOfStock, Won, OutOfStock, Other, Won], 2);
        assert_eq!(
            report,
            Fairness {
                winners: 3,
                winners_among_first: 1,
                // The 2nd is passed by the 3rd and 6th; the 4th by the
                // 6th; the 5th was refused by a limit, not for stock.
                inversions: 3,
                passed_over: 2,
            }
        );
        assert_eq!(fairness(&[Won, Won, OutOfStock], 2).inversions, 0);
    }
}
