//! Every way `POST /v1/purchases` says no, and the problem answer each one
//! is: the README's refusal table, in code. The decision (`decision.rs`)
//! says which; this says how it reads to the buyer, and under which label
//! it is counted in `gateway_shed_total`.

use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use flashsale_core::ids::{Sku, UserId};
use flashsale_core::service::problem::Problem;

use crate::auth;
use crate::limits::Denied;

#[derive(Debug, Clone)]
pub enum Refusal {
    /// The body is not a purchase: not JSON, not `application/json`, too
    /// large, or a field of the wrong type (the extractor's own words).
    Body {
        status: StatusCode,
        kind: &'static str,
        detail: String,
    },
    InvalidSku(String),
    InvalidUserId(String),
    InvalidQuantity(String),
    InvalidIdempotencyKey,
    /// `401`, as the token check words it (with its challenge header).
    Unauthenticated(Problem),
    /// `403`: a valid token, and a body naming another buyer.
    NotThisBuyer {
        subject: UserId,
        named: String,
    },
    /// No sale of the sku, in Redis or DynamoDB.
    UnknownSku(Sku),
    /// The key named an earlier purchase of something else.
    KeyReused {
        earlier_sku: String,
        earlier_quantity: u32,
    },
    /// The key named a purchase of an earlier sale of the same sku.
    KeyOfEarlierSale(Sku),
    SoldOut(Sku),
    /// Sold out as Redis counted it just now: `people` ahead, `cap` allowed.
    LineFull {
        sku: Sku,
        people: u64,
        cap: u64,
    },
    NotActive(Sku),
    InProgress,
    UserRateLimited {
        user: UserId,
        denied: Denied,
    },
    /// This instance's own rate.
    Overloaded(Denied),
    /// This instance's produces in flight.
    InFlightFull,
    Timeout {
        limit: Duration,
    },
    /// A store could not be asked.
    Unavailable {
        what: &'static str,
        error: String,
    },
    /// The sku's stock was lost with Redis and is not recovered yet.
    StockRestoring(Sku),
    /// The broker did not take the purchase. `voided`: it is known not to
    /// be processed; else that could not be made sure of.
    Unqueued {
        why: String,
        voided: bool,
    },
}

/// The `gateway_shed_total` reasons that say a store failed (Redis, the
/// broker), not that the sale turned the buyer away: shown at 0 from the
/// start, for the alert on their rate (`infra/k8s/components/prometheus-alerts`).
pub const STORE_FAILURE_REASONS: [&str; 3] = ["unavailable", "broker", "timeout"];

impl Refusal {
    /// From the JSON extractor's rejection, keeping its status.
    pub fn body(rejection: JsonRejection) -> Self {
        let kind = match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => "body-too-large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported-media-type",
            StatusCode::UNPROCESSABLE_ENTITY => "invalid-field",
            _ => "malformed-json",
        };
        Self::Body {
            status: rejection.status(),
            kind,
            detail: rejection.body_text(),
        }
    }

    pub fn unavailable(what: &'static str, error: impl std::fmt::Display) -> Self {
        Self::Unavailable {
            what,
            error: error.to_string(),
        }
    }

    /// The reason label of `gateway_shed_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Body { .. }
            | Self::InvalidSku(_)
            | Self::InvalidUserId(_)
            | Self::InvalidQuantity(_)
            | Self::InvalidIdempotencyKey
            | Self::UnknownSku(_)
            | Self::KeyReused { .. }
            | Self::KeyOfEarlierSale(_) => "invalid",
            Self::Unauthenticated(_) | Self::NotThisBuyer { .. } => "unauthenticated",
            Self::SoldOut(_) | Self::LineFull { .. } => "sold_out",
            Self::NotActive(_) => "not_active",
            Self::InProgress => "in_progress",
            Self::UserRateLimited { .. } => "user_rate",
            Self::Overloaded(_) => "global_rate",
            Self::InFlightFull => "in_flight",
            Self::Timeout { .. } => "timeout",
            Self::Unavailable { .. } | Self::StockRestoring(_) => "unavailable",
            Self::Unqueued { .. } => "broker",
        }
    }

    pub fn problem(&self) -> Problem {
        let invalid = |kind, detail| Problem::new(StatusCode::UNPROCESSABLE_ENTITY, kind, detail);
        match self {
            Self::Body {
                status,
                kind,
                detail,
            } => Problem::new(*status, kind, detail.clone()),
            Self::InvalidSku(why) => invalid("invalid-sku", why.clone()),
            Self::InvalidUserId(why) => invalid("invalid-user-id", why.clone()),
            Self::InvalidQuantity(why) => invalid("invalid-quantity", why.clone()),
            Self::InvalidIdempotencyKey => Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid-idempotency-key",
                "Idempotency-Key must be 1 to 255 visible ASCII characters",
            ),
            Self::Unauthenticated(problem) => problem.clone(),
            Self::NotThisBuyer { subject, named } => auth::not_this_buyer(subject, named),
            Self::UnknownSku(sku) => {
                invalid("unknown-sku", format!("there is no sale for sku {sku:?}"))
            }
            Self::KeyReused {
                earlier_sku,
                earlier_quantity,
            } => invalid(
                "idempotency-key-reused",
                format!(
                    "this Idempotency-Key was used for {earlier_quantity} x {earlier_sku}; \
                     a different purchase needs a new key"
                ),
            ),
            Self::KeyOfEarlierSale(sku) => invalid(
                "idempotency-key-reused",
                format!(
                    "this Idempotency-Key was used for a purchase of an earlier sale of \
                     {sku}; a new purchase needs a new key"
                ),
            ),
            Self::SoldOut(sku) => Problem::new(
                StatusCode::CONFLICT,
                "sold-out",
                format!(
                    "{sku} is sold out: its units are sold or held for buyers ahead in its line, \
                     who get any unit that comes back"
                ),
            ),
            Self::LineFull { sku, people, cap } => Problem::new(
                StatusCode::CONFLICT,
                "sold-out",
                format!(
                    "{sku} is sold out: its units are sold or held for the {people} buyers \
                     ahead in its line (at most {cap} may be); units that come back go to them"
                ),
            ),
            // Closed or over: final. (Before the opening a buyer takes a
            // place in the line instead.)
            Self::NotActive(sku) => Problem::new(
                StatusCode::CONFLICT,
                "sale-not-active",
                format!("the sale of {sku} is closed or over"),
            ),
            Self::InProgress => Problem::new(
                StatusCode::CONFLICT,
                "request-in-progress",
                "a request with this Idempotency-Key is being queued right now; \
                 retry in a second to read its result",
            )
            .retry_after(1),
            Self::UserRateLimited { user, denied } => rate_limited(
                StatusCode::TOO_MANY_REQUESTS,
                "user-rate-limited",
                format!(
                    "{user} sent more than {} purchases in a burst ({}/s on average)",
                    denied.limit, denied.per_second
                ),
                denied,
            ),
            Self::Overloaded(denied) => rate_limited(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "this gateway takes no more purchases per second right now".into(),
                denied,
            ),
            Self::InFlightFull => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "too many purchases wait for the broker's acknowledgement; retry shortly",
            )
            .retry_after(1),
            Self::Timeout { limit } => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                format!(
                    "the purchase was not queued within {} ms; retry with the same Idempotency-Key",
                    limit.as_millis()
                ),
            )
            .retry_after(1),
            Self::Unavailable { what, .. } => unavailable(what),
            Self::StockRestoring(sku) => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "stock-unavailable",
                format!(
                    "the stock of {sku} is being restored; retry with the same Idempotency-Key"
                ),
            )
            .retry_after(1),
            Self::Unqueued { why, voided: true } => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily-unavailable",
                format!(
                    "the purchase queue did not take the purchase ({why}); it will not be \
                     processed: retry (with the same Idempotency-Key)"
                ),
            )
            .retry_after(1),
            Self::Unqueued { voided: false, .. } => unavailable("the purchase queue"),
        }
    }
}

/// `503` for a store that cannot be asked; the error itself is logged, not
/// told.
pub fn unavailable(what: &str) -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "temporarily-unavailable",
        format!("{what} is unavailable right now; retry with the same Idempotency-Key"),
    )
    .retry_after(1)
}

/// A refusal by a rate limit, with `Retry-After` and the `RateLimit-*`
/// headers of the IETF draft (limit, remaining, seconds to reset).
fn rate_limited(status: StatusCode, kind: &str, detail: String, denied: &Denied) -> Problem {
    let wait = denied.retry_after_secs();
    Problem::new(status, kind, detail)
        .retry_after(wait)
        .header("ratelimit-limit", denied.limit)
        .header("ratelimit-remaining", 0)
        .header("ratelimit-reset", wait)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_failure_reasons_are_those_of_refusals_a_store_caused() {
        let failures = [
            Refusal::Timeout {
                limit: Duration::from_secs(1),
            },
            Refusal::unavailable("Redis", "connection refused"),
            Refusal::Unqueued {
                why: "broker down".into(),
                voided: true,
            },
        ];
        for refusal in &failures {
            assert!(
                STORE_FAILURE_REASONS.contains(&refusal.label()),
                "{}",
                refusal.label()
            );
        }
        let labels: Vec<&str> = failures.iter().map(Refusal::label).collect();
        assert!(STORE_FAILURE_REASONS.iter().all(|r| labels.contains(r)));
        for sale in [Refusal::InFlightFull, Refusal::InProgress] {
            assert!(!STORE_FAILURE_REASONS.contains(&sale.label()));
        }
    }
}
