//! Whether a purchase goes on the queue: the admission decision, apart from
//! the I/O that gathers what it is decided on, so that tests drive it with
//! plain values and no server or store.
//!
//! The decision is a function of the request, what this instance knows
//! (its copy of the sku's flags, its rate limits' verdicts, whether a
//! produce slot is free) and what the stores answered (the status board,
//! the sku's line in Redis). Those answers cost round trips and a rate
//! verdict spends a token, so they are found out only when the decision
//! needs them: `next` either decides, or names the one fact it needs next
//! (`Step::Ask`), cheapest first. The HTTP layer (`purchase.rs`) finds it
//! out, writes it into `Facts` and asks again; it makes no decision of its
//! own. The same shape as a sans-I/O protocol state machine.

use axum::http::{HeaderMap, HeaderValue};
use flashsale_core::ids::{IdempotencyKey, Quantity, RequestId, Sku, UserId};
use flashsale_core::status::{PurchaseState, PurchaseStatus};
use flashsale_core::stock::{Admission, ReserveOutcome, SkuFlags};
use serde::Deserialize;

use crate::auth::Authenticator;
use crate::limits::Denied;
use crate::refusal::Refusal;

/// The body of `POST /v1/purchases`. Public so that the benchmark's no-op
/// server parses exactly what the gateway parses.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurchaseBody {
    pub sku: String,
    /// The buyer; may be left out when the gateway verifies tokens (the
    /// token's subject is the buyer then).
    #[serde(default)]
    pub user_id: Option<String>,
    pub quantity: i64,
}

/// A well-formed purchase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purchase {
    pub id: RequestId,
    pub sku: Sku,
    pub user: UserId,
    pub quantity: Quantity,
    /// It came with an `Idempotency-Key` (its id derives from buyer and
    /// key, so it may have been asked for before).
    pub keyed: bool,
}

/// Reads a purchase from the body (as the JSON extractor left it) and the
/// headers, checking in the order a buyer would fix them; `fresh` gives
/// the id of a purchase without an `Idempotency-Key`.
pub fn read(
    body: Result<PurchaseBody, Refusal>,
    headers: &HeaderMap,
    auth: Option<&Authenticator>,
    fresh: impl FnOnce() -> RequestId,
) -> Result<Purchase, Refusal> {
    let body = body?;
    let sku = Sku::parse(&body.sku).map_err(|e| Refusal::InvalidSku(e.to_string()))?;
    let user = buyer(auth, headers, body.user_id)?;
    let quantity =
        Quantity::new(body.quantity).map_err(|e| Refusal::InvalidQuantity(e.to_string()))?;
    let key = headers
        .get("idempotency-key")
        .map(idempotency_key)
        .transpose()?;
    Ok(Purchase {
        id: key
            .as_ref()
            .map_or_else(fresh, |key| RequestId::derive(&user, key)),
        sku,
        user,
        quantity,
        keyed: key.is_some(),
    })
}

fn idempotency_key(raw: &HeaderValue) -> Result<IdempotencyKey, Refusal> {
    raw.to_str()
        .ok()
        .and_then(|raw| IdempotencyKey::parse(raw).ok())
        .ok_or(Refusal::InvalidIdempotencyKey)
}

/// Who is buying: the token's subject when tokens are verified (a body
/// naming someone else is refused), else the body's `user_id`.
fn buyer(
    auth: Option<&Authenticator>,
    headers: &HeaderMap,
    named: Option<String>,
) -> Result<UserId, Refusal> {
    match (auth, named) {
        (Some(auth), named) => {
            let subject = auth.buyer(headers).map_err(Refusal::Unauthenticated)?;
            match named {
                Some(named) if named != subject.as_str() => {
                    Err(Refusal::NotThisBuyer { subject, named })
                }
                _ => Ok(subject),
            }
        }
        (None, Some(named)) => {
            UserId::parse(&named).map_err(|e| Refusal::InvalidUserId(e.to_string()))
        }
        (None, None) => Err(Refusal::InvalidUserId("user_id is required".into())),
    }
}

/// What is known about a purchase so far. `None` in a field the decision
/// asks for: not found out yet.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// This instance's clock (unix ms).
    pub now_ms: u64,
    /// This instance's copy of the sku's flags; `None`: not heard of it.
    pub flags: Option<SkuFlags>,
    /// Whether the copy says this request id may have been let into the
    /// sku's line (a repeat of it must then be answered, not refused).
    pub may_be_admitted: bool,
    /// The buyer's rate limit (spends a token).
    pub user_rate: Option<Result<(), Denied>>,
    /// The status board's post for a keyed purchase; `Some(None)`: none.
    pub earlier: Option<Option<PurchaseStatus>>,
    /// This instance's rate limit (spends a token).
    pub global_rate: Option<Result<(), Denied>>,
    /// Whether a produce slot was free (the caller holds it).
    pub produce_slot: Option<bool>,
    /// The sku's line in Redis, which lets the purchase in or not.
    pub admission: Option<Admission>,
    /// The board read again after Redis said the id was seen before.
    pub earlier_since_admission: Option<Option<PurchaseStatus>>,
    /// Whether DynamoDB holds a sale of a sku Redis does not know.
    pub sale_exists: Option<bool>,
}

/// A fact the decision needs; `Facts` says what each is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Question {
    UserRate,
    Earlier,
    GlobalRate,
    ProduceSlot,
    Admission,
    EarlierSinceAdmission,
    SaleExists,
}

#[derive(Debug, Clone)]
pub enum Step {
    /// Find this out, put it in the facts, and call `next` again.
    Ask(Question),
    Refuse(Refusal),
    /// `202` with the purchase's state now: a repeat, or one already
    /// answered by a shop-worker.
    Answer(PurchaseState),
    /// Produce it to the purchase topic. `admitted`: this request took its
    /// place in the line now, and gives it back if the broker fails;
    /// `at_ms`: when, by the admission's clock.
    Enqueue {
        admitted: bool,
        at_ms: u64,
    },
}

/// The rules the decision applies beyond the facts.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// How long after its admission a purchase never acknowledged counts
    /// as abandoned by the instance that admitted it (which died), and may
    /// be queued again.
    pub abandoned_after_ms: u64,
}

/// The next step for `purchase`, given what is known.
///
/// The checks, cheapest first: the closed and line-full flags in memory
/// (no network call, also for a repeated key unless it names a purchase
/// let in); the buyer's rate; for a repeated key, the status board; this
/// instance's rate and produce slots; then the sku's shared line in
/// Redis, whose clock (not this instance's) admits, so that every gateway
/// shares one line.
pub fn next(purchase: &Purchase, facts: &Facts, rules: &Rules) -> Step {
    let sku = &purchase.sku;
    if let Some(flags) = facts.flags
        && (!purchase.keyed || !facts.may_be_admitted)
    {
        if flags.over(facts.now_ms) {
            return Step::Refuse(Refusal::NotActive(sku.clone()));
        }
        if flags.line_full {
            return Step::Refuse(Refusal::SoldOut(sku.clone()));
        }
    }
    match facts.user_rate {
        None => return Step::Ask(Question::UserRate),
        Some(Err(denied)) => {
            return Step::Refuse(Refusal::UserRateLimited {
                user: purchase.user.clone(),
                denied,
            });
        }
        Some(Ok(())) => {}
    }
    if purchase.keyed {
        match &facts.earlier {
            None => return Step::Ask(Question::Earlier),
            Some(Some(earlier)) => return repeat(purchase, earlier),
            Some(None) => {}
        }
    }
    match facts.global_rate {
        None => return Step::Ask(Question::GlobalRate),
        Some(Err(denied)) => return Step::Refuse(Refusal::Overloaded(denied)),
        Some(Ok(())) => {}
    }
    match facts.produce_slot {
        None => return Step::Ask(Question::ProduceSlot),
        Some(false) => return Step::Refuse(Refusal::InFlightFull),
        Some(true) => {}
    }
    let Some(admission) = &facts.admission else {
        return Step::Ask(Question::Admission);
    };
    match admission {
        Admission::Admitted { at_ms } => Step::Enqueue {
            admitted: true,
            at_ms: *at_ms,
        },
        // Seen before: the board, read again, may know it by now.
        Admission::Processed(outcome) => match seen_before(purchase, facts) {
            Some(step) => step,
            None => Step::Answer(state_of(outcome)),
        },
        Admission::Duplicate {
            admitted_at_ms,
            now_ms,
        } => match seen_before(purchase, facts) {
            Some(step) => step,
            None if now_ms.saturating_sub(*admitted_at_ms) < rules.abandoned_after_ms => {
                Step::Refuse(Refusal::InProgress)
            }
            // Admitted long enough ago that its produce has ended, and
            // never acknowledged: the instance that admitted it died.
            // Queue it again; a shop-worker answers a request id once.
            None => Step::Enqueue {
                admitted: false,
                at_ms: *now_ms,
            },
        },
        Admission::Full { people, cap } => Step::Refuse(Refusal::LineFull {
            sku: sku.clone(),
            people: *people,
            cap: *cap,
        }),
        Admission::SoldOut => Step::Refuse(Refusal::SoldOut(sku.clone())),
        Admission::NotActive => Step::Refuse(Refusal::NotActive(sku.clone())),
        // Redis holds no stock for it: lost with Redis and not recovered
        // yet (a sale this gateway has heard of, or one DynamoDB holds), so
        // retry; or no sale at all.
        Admission::Unknown => {
            let sold = match (facts.flags, facts.sale_exists) {
                (Some(_), _) => true,
                (None, Some(exists)) => exists,
                (None, None) => return Step::Ask(Question::SaleExists),
            };
            Step::Refuse(if sold {
                Refusal::StockRestoring(sku.clone())
            } else {
                Refusal::UnknownSku(sku.clone())
            })
        }
        Admission::Reused => Step::Refuse(Refusal::KeyOfEarlierSale(sku.clone())),
    }
}

/// For a request id Redis has seen: the board's second read, if it holds
/// the purchase now (or asks for that read).
fn seen_before(purchase: &Purchase, facts: &Facts) -> Option<Step> {
    match &facts.earlier_since_admission {
        None => Some(Step::Ask(Question::EarlierSinceAdmission)),
        Some(Some(earlier)) => Some(repeat(purchase, earlier)),
        Some(None) => None,
    }
}

/// A POST repeated with the same Idempotency-Key: the same purchase, if it
/// asks for the same thing.
fn repeat(purchase: &Purchase, earlier: &PurchaseStatus) -> Step {
    if earlier.sku != purchase.sku.as_str() || earlier.quantity != purchase.quantity.get() {
        return Step::Refuse(Refusal::KeyReused {
            earlier_sku: earlier.sku.clone(),
            earlier_quantity: earlier.quantity,
        });
    }
    Step::Answer(earlier.status)
}

/// The state a buyer is told for a shop-worker's answer.
pub fn state_of(outcome: &ReserveOutcome) -> PurchaseState {
    match outcome {
        ReserveOutcome::Reserved { .. } => PurchaseState::Reserved,
        ReserveOutcome::Rejected { .. } | ReserveOutcome::Voided => PurchaseState::Rejected,
        ReserveOutcome::Waiting => PurchaseState::Waiting,
    }
}

/// How a produce the broker did not take ends for its buyer, once the
/// purchase was voided (`void`: what a shop-worker had answered it with
/// already, if it had; `Err` if the void failed): the state to answer
/// `202` with, or the refusal.
pub fn after_failed_produce<E>(
    why: String,
    void: Result<Option<ReserveOutcome>, E>,
) -> Result<PurchaseState, Refusal> {
    match void {
        Ok(None) => Err(Refusal::Unqueued { why, voided: true }),
        // It went through after all, and a shop-worker answered it.
        Ok(Some(outcome)) => Ok(state_of(&outcome)),
        Err(_) => Err(Refusal::Unqueued { why, voided: false }),
    }
}

/// One test per row of the README's refusal table (and the way to a
/// `202`), each driving the decision with plain values.
#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use axum::body::Body;
    use axum::extract::FromRequest;
    use axum::http::{Request, header};
    use flashsale_core::service::problem::Problem;
    use flashsale_core::service::settings::Env;

    use super::*;
    use crate::auth::AuthSettings;

    const RULES: Rules = Rules {
        abandoned_after_ms: 5_000,
    };

    fn purchase(keyed: bool) -> Purchase {
        let user = UserId::parse("ann").expect("a user");
        let key = IdempotencyKey::parse("k-1").expect("a key");
        Purchase {
            id: if keyed {
                RequestId::derive(&user, &key)
            } else {
                RequestId::fresh()
            },
            sku: Sku::parse("tee").expect("a sku"),
            user,
            quantity: Quantity::new(1).expect("a quantity"),
            keyed,
        }
    }

    fn status(sku: &str, quantity: u32, state: &str) -> PurchaseStatus {
        serde_json::from_value(serde_json::json!({
            "request_id": RequestId::fresh().to_string(),
            "sku": sku,
            "user_id": "ann",
            "quantity": quantity,
            "status": state,
            "updated_at_ms": 1,
        }))
        .expect("a status")
    }

    fn denied() -> Denied {
        Denied {
            retry_after: Duration::from_millis(1_500),
            limit: 5,
            per_second: 2.0,
        }
    }

    /// Finds out `question` as `answers` say, or as when nothing stands in
    /// the way.
    fn find_out(question: Question, answers: &Facts, facts: &mut Facts) {
        match question {
            Question::UserRate => facts.user_rate = answers.user_rate.or(Some(Ok(()))),
            Question::Earlier => facts.earlier = answers.earlier.clone().or(Some(None)),
            Question::GlobalRate => facts.global_rate = answers.global_rate.or(Some(Ok(()))),
            Question::ProduceSlot => facts.produce_slot = answers.produce_slot.or(Some(true)),
            Question::Admission => {
                facts.admission =
                    (answers.admission.clone()).or(Some(Admission::Admitted { at_ms: 7 }));
            }
            Question::EarlierSinceAdmission => {
                facts.earlier_since_admission =
                    answers.earlier_since_admission.clone().or(Some(None));
            }
            Question::SaleExists => facts.sale_exists = answers.sale_exists.or(Some(true)),
        }
    }

    /// Runs the decision to its end as `purchase.rs` does, from `facts`,
    /// each fact found out as `answers` say; returns what was asked, in
    /// order, and the final step.
    fn drive(purchase: &Purchase, mut facts: Facts, answers: &Facts) -> (Vec<Question>, Step) {
        let mut asked = Vec::new();
        loop {
            match next(purchase, &facts, &RULES) {
                Step::Ask(question) => {
                    assert!(!asked.contains(&question), "{question:?} asked twice");
                    asked.push(question);
                    find_out(question, answers, &mut facts);
                }
                step => return (asked, step),
            }
        }
    }

    /// The answers when Redis's line answers `admission`.
    fn admitting(admission: Admission) -> Facts {
        Facts {
            admission: Some(admission),
            ..Facts::default()
        }
    }

    fn refused(step: Step) -> Problem {
        match step {
            Step::Refuse(refusal) => refusal.problem(),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn flags(set: impl FnOnce(&mut SkuFlags)) -> Facts {
        let mut flags = SkuFlags::default();
        set(&mut flags);
        Facts {
            now_ms: 1_000,
            flags: Some(flags),
            ..Facts::default()
        }
    }

    fn auth() -> Authenticator {
        let env = Env::from_map(HashMap::from([
            (
                "FLASHSALE_GATEWAY_AUTH_HS256_SECRET".to_owned(),
                "s".repeat(32),
            ),
            (
                "FLASHSALE_GATEWAY_AUTH_ISSUER".to_owned(),
                "shop".to_owned(),
            ),
            (
                "FLASHSALE_GATEWAY_AUTH_AUDIENCE".to_owned(),
                "sale".to_owned(),
            ),
        ]));
        let settings = AuthSettings::from_env(&env).expect("valid settings");
        Authenticator::from_settings(&settings)
            .expect("keys")
            .expect("on")
    }

    fn bearer(subject: &str) -> HeaderMap {
        let claims = serde_json::json!({
            "sub": subject, "iss": "shop", "aud": "sale",
            "exp": flashsale_core::clock::now_ms() / 1000 + 600,
        });
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret("s".repeat(32).as_bytes()).expect("a key"),
        )
        .expect("a token");
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().expect("a header"),
        );
        headers
    }

    fn body(user: Option<&str>) -> Result<PurchaseBody, Refusal> {
        Ok(PurchaseBody {
            sku: "tee".into(),
            user_id: user.map(str::to_owned),
            quantity: 1,
        })
    }

    fn read_with(
        body: Result<PurchaseBody, Refusal>,
        headers: &HeaderMap,
        auth: Option<&Authenticator>,
    ) -> Result<Purchase, Problem> {
        read(body, headers, auth, RequestId::fresh).map_err(|r| r.problem())
    }

    /// What the JSON extractor makes of a request body.
    async fn extracted(content_type: &str, body: Vec<u8>) -> Result<PurchaseBody, Refusal> {
        let request = Request::post("/v1/purchases")
            .header(header::CONTENT_TYPE, content_type)
            .body(Body::from(body))
            .expect("a request");
        axum::Json::<PurchaseBody>::from_request(request, &())
            .await
            .map(|axum::Json(body)| body)
            .map_err(Refusal::body)
    }

    #[test]
    fn a_clear_purchase_is_asked_about_cheapest_first_and_queued() {
        let (asked, step) = drive(&purchase(true), Facts::default(), &Facts::default());
        assert_eq!(
            asked,
            [
                Question::UserRate,
                Question::Earlier,
                Question::GlobalRate,
                Question::ProduceSlot,
                Question::Admission
            ]
        );
        assert!(matches!(
            step,
            Step::Enqueue {
                admitted: true,
                at_ms: 7
            }
        ));
        // Without a key there is no earlier purchase to look for.
        let (asked, _) = drive(&purchase(false), Facts::default(), &Facts::default());
        assert!(!asked.contains(&Question::Earlier), "{asked:?}");
    }

    #[test]
    fn a_repeated_key_is_answered_with_its_purchase_before_any_limit_but_the_buyers() {
        let (asked, step) = drive(
            &purchase(true),
            Facts::default(),
            &Facts {
                earlier: Some(Some(status("tee", 1, "reserved"))),
                ..Facts::default()
            },
        );
        assert_eq!(asked, [Question::UserRate, Question::Earlier]);
        assert!(matches!(step, Step::Answer(PurchaseState::Reserved)));
        // A line full in memory does not hide a purchase that was let in.
        let mut facts = flags(|f| f.line_full = true);
        facts.may_be_admitted = true;
        let (_, step) = drive(
            &purchase(true),
            facts,
            &Facts {
                earlier: Some(Some(status("tee", 1, "queued"))),
                ..Facts::default()
            },
        );
        assert!(matches!(step, Step::Answer(PurchaseState::Queued)));
        // Redis had answered it, the board had not yet heard: the answer.
        let (_, step) = drive(
            &purchase(false),
            Facts::default(),
            &admitting(Admission::Processed(ReserveOutcome::Waiting)),
        );
        assert!(matches!(step, Step::Answer(PurchaseState::Waiting)));
    }

    #[test]
    fn row_401_no_token_or_an_unreadable_one_is_unauthenticated() {
        let auth = auth();
        let problem = read_with(body(None), &HeaderMap::new(), Some(&auth)).expect_err("no token");
        assert_eq!(
            (problem.status, problem.kind.as_str()),
            (401, "missing-token")
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            "Bearer x.y.z".parse().expect("header"),
        );
        let problem = read_with(body(None), &headers, Some(&auth)).expect_err("a bad token");
        assert_eq!(
            (problem.status, problem.kind.as_str()),
            (401, "invalid-token")
        );
        assert!(
            problem
                .headers
                .iter()
                .any(|(name, value)| *name == "www-authenticate" && value.contains("invalid_token")),
            "{problem:?}"
        );
        let purchase = read_with(body(None), &bearer("ann"), Some(&auth)).expect("a good token");
        assert_eq!(purchase.user.as_str(), "ann");
    }

    #[test]
    fn row_403_a_body_naming_another_buyer_than_the_token_is_forbidden() {
        let auth = auth();
        let problem =
            read_with(body(Some("ben")), &bearer("ann"), Some(&auth)).expect_err("someone else");
        assert_eq!(
            (problem.status, problem.kind.as_str()),
            (403, "user-mismatch")
        );
        assert!(read_with(body(Some("ann")), &bearer("ann"), Some(&auth)).is_ok());
    }

    #[test]
    fn row_409_sold_out_from_memory_before_any_call_and_from_the_line() {
        let (asked, step) = drive(
            &purchase(false),
            flags(|f| f.line_full = true),
            &Facts::default(),
        );
        assert!(asked.is_empty(), "{asked:?}");
        let problem = refused(step);
        assert_eq!((problem.status, problem.kind.as_str()), (409, "sold-out"));
        assert_eq!(problem.retry_after_s, None);
        let (_, step) = drive(
            &purchase(false),
            Facts::default(),
            &admitting(Admission::Full {
                people: 12,
                cap: 12,
            }),
        );
        let problem = refused(step);
        assert_eq!((problem.status, problem.kind.as_str()), (409, "sold-out"));
        assert!(problem.detail.contains("12 buyers"), "{}", problem.detail);
    }

    #[test]
    fn row_409_sale_not_active_when_closed_or_over() {
        for facts in [flags(|f| f.closed = true), flags(|f| f.ends_at_ms = 1_000)] {
            let (asked, step) = drive(&purchase(false), facts, &Facts::default());
            assert!(asked.is_empty(), "{asked:?}");
            let problem = refused(step);
            assert_eq!(
                (problem.status, problem.kind.as_str()),
                (409, "sale-not-active")
            );
        }
        let (_, step) = drive(
            &purchase(false),
            Facts::default(),
            &admitting(Admission::NotActive),
        );
        assert_eq!(refused(step).kind, "sale-not-active");
    }

    #[test]
    fn row_409_request_in_progress_until_its_admission_is_abandoned() {
        let seen_at = |now_ms| Facts {
            admission: Some(Admission::Duplicate {
                admitted_at_ms: 10_000,
                now_ms,
            }),
            ..Facts::default()
        };
        let (_, step) = drive(&purchase(true), Facts::default(), &seen_at(10_000 + 4_999));
        let problem = refused(step);
        assert_eq!(
            (problem.status, problem.kind.as_str(), problem.retry_after_s),
            (409, "request-in-progress", Some(1))
        );
        let (asked, step) = drive(&purchase(true), Facts::default(), &seen_at(10_000 + 5_000));
        assert_eq!(asked.last(), Some(&Question::EarlierSinceAdmission));
        assert!(matches!(
            step,
            Step::Enqueue {
                admitted: false,
                at_ms: 15_000
            }
        ));
    }

    #[test]
    fn row_429_a_buyer_over_their_burst_is_rate_limited_with_when_to_retry() {
        let (asked, step) = drive(
            &purchase(true),
            Facts::default(),
            &Facts {
                user_rate: Some(Err(denied())),
                ..Facts::default()
            },
        );
        assert_eq!(asked, [Question::UserRate]);
        let problem = refused(step);
        assert_eq!(
            (problem.status, problem.kind.as_str(), problem.retry_after_s),
            (429, "user-rate-limited", Some(2))
        );
        for name in ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"] {
            assert!(problem.headers.iter().any(|(n, _)| *n == name), "{name}");
        }
    }

    #[test]
    fn row_503_overloaded_by_this_instances_rate_or_its_produces_in_flight() {
        let (asked, step) = drive(
            &purchase(false),
            Facts::default(),
            &Facts {
                global_rate: Some(Err(denied())),
                ..Facts::default()
            },
        );
        assert_eq!(asked.last(), Some(&Question::GlobalRate));
        let problem = refused(step);
        assert_eq!((problem.status, problem.kind.as_str()), (503, "overloaded"));
        assert!(problem.headers.iter().any(|(n, _)| *n == "ratelimit-limit"));
        let (asked, step) = drive(
            &purchase(false),
            Facts::default(),
            &Facts {
                produce_slot: Some(false),
                ..Facts::default()
            },
        );
        assert!(!asked.contains(&Question::Admission), "{asked:?}");
        let problem = refused(step);
        assert_eq!(
            (problem.status, problem.kind.as_str(), problem.retry_after_s),
            (503, "overloaded", Some(1))
        );
    }

    #[test]
    fn row_503_timeout_says_how_long_it_waited() {
        let problem = Refusal::Timeout {
            limit: Duration::from_millis(2_000),
        }
        .problem();
        assert_eq!(
            (problem.status, problem.kind.as_str(), problem.retry_after_s),
            (503, "timeout", Some(1))
        );
        assert!(problem.detail.contains("2000 ms"), "{}", problem.detail);
    }

    #[test]
    fn row_503_unavailable_when_a_store_or_the_queue_fails_or_the_stock_is_restored() {
        let problem = Refusal::unavailable("the stock store", "connection refused").problem();
        assert_eq!(
            (problem.status, problem.kind.as_str(), problem.retry_after_s),
            (503, "temporarily-unavailable", Some(1))
        );
        assert!(
            !problem.detail.contains("refused"),
            "the error is logged, not told"
        );
        let failed = after_failed_produce::<()>("timed out".into(), Ok(None));
        let problem = failed.expect_err("voided").problem();
        assert_eq!(problem.kind, "temporarily-unavailable");
        assert!(problem.detail.contains("will not be processed"));
        let failed = after_failed_produce("timed out".into(), Err("no redis"));
        assert_eq!(
            failed.expect_err("not voided").problem().kind,
            "temporarily-unavailable"
        );
        let late =
            after_failed_produce::<()>("timed out".into(), Ok(Some(ReserveOutcome::Waiting)));
        assert_eq!(late.ok(), Some(PurchaseState::Waiting));
        // Redis lost the sku's stock: a sale this gateway has heard of, or
        // one DynamoDB holds, is being restored.
        let lost = Facts {
            admission: Some(Admission::Unknown),
            ..Facts::default()
        };
        let (asked, step) = drive(&purchase(false), flags(|_| {}), &lost);
        assert!(!asked.contains(&Question::SaleExists));
        let problem = refused(step);
        assert_eq!(
            (problem.status, problem.kind.as_str()),
            (503, "stock-unavailable")
        );
        let (asked, step) = drive(&purchase(false), Facts::default(), &lost);
        assert_eq!(asked.last(), Some(&Question::SaleExists));
        assert_eq!(refused(step).kind, "stock-unavailable");
    }

    #[tokio::test]
    async fn row_4xx_bad_input_is_named() {
        let json = "application/json";
        let no_headers = HeaderMap::new();
        let kind_of = |result: Result<Purchase, Problem>| {
            let problem = result.expect_err("bad input");
            (problem.status, problem.kind)
        };
        let cases: Vec<(Result<PurchaseBody, Refusal>, u16, &str)> = vec![
            (extracted(json, b"{".to_vec()).await, 400, "malformed-json"),
            (
                extracted("text/plain", b"{}".to_vec()).await,
                415,
                "unsupported-media-type",
            ),
            (
                extracted(json, vec![b' '; 3 << 20]).await,
                413,
                "body-too-large",
            ),
            (
                extracted(
                    json,
                    br#"{"sku":"tee","user_id":"ann","quantity":"1"}"#.to_vec(),
                )
                .await,
                422,
                "invalid-field",
            ),
            (
                extracted(json, br#"{"sku":"","user_id":"ann","quantity":1}"#.to_vec()).await,
                422,
                "invalid-sku",
            ),
            (
                extracted(json, br#"{"sku":"tee","quantity":1}"#.to_vec()).await,
                422,
                "invalid-user-id",
            ),
            (
                extracted(
                    json,
                    br#"{"sku":"tee","user_id":"ann","quantity":0}"#.to_vec(),
                )
                .await,
                422,
                "invalid-quantity",
            ),
        ];
        for (body, status, kind) in cases {
            assert_eq!(
                kind_of(read_with(body, &no_headers, None)),
                (status, kind.to_owned())
            );
        }
        let mut headers = HeaderMap::new();
        headers.insert("idempotency-key", "a key".parse().expect("header"));
        assert_eq!(
            kind_of(read_with(body(Some("ann")), &headers, None)),
            (400, "invalid-idempotency-key".to_owned())
        );
        // Well-formed, and still not a purchase: no such sale, or a key
        // used before for something else.
        let no_sale = Facts {
            admission: Some(Admission::Unknown),
            sale_exists: Some(false),
            ..Facts::default()
        };
        let (_, step) = drive(&purchase(false), Facts::default(), &no_sale);
        let problem = refused(step);
        assert_eq!(
            (problem.status, problem.kind.as_str()),
            (422, "unknown-sku")
        );
        let (_, step) = drive(
            &purchase(true),
            Facts::default(),
            &Facts {
                earlier: Some(Some(status("mug", 1, "confirmed"))),
                ..Facts::default()
            },
        );
        let problem = refused(step);
        assert_eq!(
            (problem.status, problem.kind.as_str()),
            (422, "idempotency-key-reused")
        );
        let (_, step) = drive(
            &purchase(true),
            Facts::default(),
            &admitting(Admission::Reused),
        );
        assert_eq!(refused(step).kind, "idempotency-key-reused");
    }
}
