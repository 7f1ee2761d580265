//! The buyers of a round: a burst at the opening, then a steady rate, each
//! buying one unit with an Idempotency-Key and behaving as a real client
//! does when the pipeline is in trouble: a `429` or `503` waits its
//! `Retry-After` and asks again, no answer at all (a gateway killed
//! mid-request) asks again after a moment, with the same key, so a retry
//! never buys twice; a buyer gives up only after `patience`.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Who arrives when.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CrowdPlan {
    /// Buyers at the first instant.
    pub burst: u64,
    /// Then this many per second...
    pub rate: f64,
    /// ...for this long.
    #[serde(with = "crate::durations::secs")]
    pub rate_for: Duration,
    /// How long a buyer keeps trying before giving up.
    #[serde(with = "crate::durations::secs")]
    pub patience: Duration,
}

impl CrowdPlan {
    /// When each buyer arrives, from the first.
    pub fn arrivals(&self) -> Vec<Duration> {
        let steady = (self.rate * self.rate_for.as_secs_f64()).round() as u64;
        let mut out = vec![Duration::ZERO; self.burst as usize];
        out.extend((0..steady).map(|i| Duration::from_secs_f64(i as f64 / self.rate.max(0.001))));
        out
    }

    /// How long until the last buyer arrives.
    pub fn window(&self) -> Duration {
        self.rate_for
    }
}

/// A purchase the gateway accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub request_id: String,
    pub user_id: String,
}

/// What the crowd was told.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CrowdOutcome {
    pub buyers: u64,
    pub accepted: Vec<Accepted>,
    /// Buyers refused for good (sold out, not active: a `409` without a
    /// `Retry-After`).
    pub refused: u64,
    /// Those buyers, and the refusal each was given (its problem type).
    pub refused_buyers: Vec<(String, String)>,
    /// Buyers who gave up (no answer but `429`, `503` or none in time).
    pub gave_up: u64,
    /// Answers that are the pipeline's fault, not the buyer's: any `5xx`
    /// but `503`, and any `4xx` but `409` and `429` (the crowd sends only
    /// valid purchases).
    pub wrong_answers: Vec<String>,
    /// Requests sent again after a refusal to wait, or after no answer.
    pub retries: u64,
}

enum Answer {
    Accepted(Accepted),
    /// The buyer, and the problem's type.
    Refused(String, String),
    GaveUp,
    Wrong(String),
}

/// Sends the crowd at `gateway_url` for `sku`; each buyer is `<prefix>-<n>`.
pub async fn run(
    http: &reqwest::Client,
    gateway_url: &str,
    sku: &str,
    prefix: &str,
    plan: &CrowdPlan,
) -> CrowdOutcome {
    let connections = Arc::new(Semaphore::new(64));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (n, offset) in plan.arrivals().into_iter().enumerate() {
        let http = http.clone();
        let url = format!("{gateway_url}/v1/purchases");
        let user = format!("{prefix}-{n}");
        let sku = sku.to_owned();
        let connections = connections.clone();
        let patience = plan.patience;
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(start + offset).await;
            buyer(&http, &url, &sku, &user, patience, &connections).await
        }));
    }
    let mut outcome = CrowdOutcome {
        buyers: tasks.len() as u64,
        ..CrowdOutcome::default()
    };
    for task in tasks {
        match task.await {
            Ok((answer, retries)) => {
                outcome.retries += retries;
                match answer {
                    Answer::Accepted(a) => outcome.accepted.push(a),
                    Answer::Refused(user, kind) => {
                        outcome.refused += 1;
                        outcome.refused_buyers.push((user, kind));
                    }
                    Answer::GaveUp => outcome.gave_up += 1,
                    Answer::Wrong(w) => outcome.wrong_answers.push(w),
                }
            }
            Err(e) => outcome
                .wrong_answers
                .push(format!("a buyer's task failed: {e}")),
        }
    }
    outcome
}

async fn buyer(
    http: &reqwest::Client,
    url: &str,
    sku: &str,
    user: &str,
    patience: Duration,
    connections: &Semaphore,
) -> (Answer, u64) {
    let until = Instant::now() + patience;
    let body = serde_json::json!({"sku": sku, "user_id": user, "quantity": 1});
    let mut retries = 0;
    loop {
        let sent = {
            let _connection = connections.acquire().await;
            http.post(url)
                .header("idempotency-key", user)
                .json(&body)
                .timeout(Duration::from_secs(5))
                .send()
                .await
        };
        let wait = match sent {
            Ok(response) => {
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                let text = response.text().await.unwrap_or_default();
                match status {
                    202 => {
                        let parsed: Option<String> =
                            serde_json::from_str::<serde_json::Value>(&text)
                                .ok()
                                .and_then(|v| v["request_id"].as_str().map(str::to_owned));
                        return match parsed {
                            Some(request_id) => (
                                Answer::Accepted(Accepted {
                                    request_id,
                                    user_id: user.to_owned(),
                                }),
                                retries,
                            ),
                            None => (
                                Answer::Wrong(format!("202 without a request id: {text}")),
                                retries,
                            ),
                        };
                    }
                    // A 409 with a Retry-After (`request-in-progress`: this
                    // key's purchase is being queued) is read again; without
                    // one (sold out, not active) it is final.
                    409 if retry_after.is_none() => {
                        let kind = serde_json::from_str::<serde_json::Value>(&text)
                            .ok()
                            .and_then(|v| v["type"].as_str().map(str::to_owned))
                            .unwrap_or_else(|| "409".to_owned());
                        return (Answer::Refused(user.to_owned(), kind), retries);
                    }
                    409 | 429 | 503 => {
                        Duration::from_secs(retry_after.unwrap_or(1)).min(Duration::from_secs(2))
                    }
                    other => {
                        return (
                            Answer::Wrong(format!("{other} for {user}: {text}")),
                            retries,
                        );
                    }
                }
            }
            // No answer: the gateway is down or restarting.
            Err(_) => Duration::from_millis(250),
        };
        if Instant::now() + wait >= until {
            return (Answer::GaveUp, retries);
        }
        retries += 1;
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_a_rate() {
        let plan = CrowdPlan {
            burst: 3,
            rate: 2.0,
            rate_for: Duration::from_secs(2),
            patience: Duration::from_secs(1),
        };
        let a = plan.arrivals();
        assert_eq!(a.len(), 7);
        assert_eq!(&a[..3], &[Duration::ZERO; 3]);
        assert_eq!(a[6], Duration::from_millis(1500));
    }
}
