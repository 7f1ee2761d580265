//! One round: a sale, a crowd, the round's faults injected and healed on
//! their schedule, the pipeline given time to settle, and every promise
//! checked.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use flashsale_cli::audit::Breach;
use flashsale_cli::sale::{self, SaleSpec};
use flashsale_core::dynamo::orders::{Order, OrderStatus};
use flashsale_core::ids::{IdempotencyKey, RequestId, Sku, UserId};
use flashsale_core::payment::{LatencyModel, StubBehaviour};
use flashsale_core::status::{PurchaseState, PurchaseStatus};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::crowd::{self, CrowdOutcome, CrowdPlan};
use crate::fault::{FaultKind, Part, PaymentTrouble, Planned};
use crate::world::{INSTANCES, Instance, World};

/// What a round is to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundPlan {
    pub index: u64,
    pub seed: u64,
    pub sku: String,
    pub stock: u64,
    pub crowd: CrowdPlan,
    pub faults: Vec<Planned>,
    /// How long after the last heal everything must have settled.
    #[serde(with = "crate::durations::secs")]
    pub settle_within: Duration,
}

/// Which promise a round found broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ViolationKind {
    /// A purchase answered `202` that never reached a terminal state.
    Lost,
    Oversold,
    DoubleCharged,
    /// A charge kept on an order that is not confirmed.
    Unrefunded,
    /// What the gateway tells the buyer differs from the order.
    StatusMismatch,
    /// A confirmed order without its charge, or with it refunded.
    WrongMoney,
    /// Units reserved, orders half-way, or a group's lag left, long after
    /// the heal: the pipeline never came back to rest.
    Unsettled,
    /// The stores disagree on the books.
    Books,
    /// A valid purchase answered with an error a client cannot act on.
    WrongAnswer,
    /// A service exited on its own.
    Crashed,
    /// The campaign could not inject or heal a fault (not the pipeline's
    /// fault, but the round proves nothing).
    Harness,
}

impl ViolationKind {
    pub const ALL: [ViolationKind; 11] = [
        Self::Lost,
        Self::Oversold,
        Self::DoubleCharged,
        Self::Unrefunded,
        Self::StatusMismatch,
        Self::WrongMoney,
        Self::Unsettled,
        Self::Books,
        Self::WrongAnswer,
        Self::Crashed,
        Self::Harness,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Lost => "lost",
            Self::Oversold => "oversold",
            Self::DoubleCharged => "double-charged",
            Self::Unrefunded => "unrefunded",
            Self::StatusMismatch => "status-mismatch",
            Self::WrongMoney => "wrong-money",
            Self::Unsettled => "unsettled",
            Self::Books => "books",
            Self::WrongAnswer => "wrong-answer",
            Self::Crashed => "crashed",
            Self::Harness => "harness",
        }
    }
}

impl From<Breach> for ViolationKind {
    fn from(breach: Breach) -> Self {
        match breach {
            Breach::Oversold => Self::Oversold,
            Breach::DoubleCharged => Self::DoubleCharged,
            Breach::Unrefunded => Self::Unrefunded,
            Breach::WrongMoney => Self::WrongMoney,
            Breach::Unsettled => Self::Unsettled,
            Breach::Books => Self::Books,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Violation {
    pub kind: ViolationKind,
    pub text: String,
}

impl Violation {
    fn new(kind: ViolationKind, text: impl Into<String>) -> Self {
        Self {
            kind,
            text: text.into(),
        }
    }
}

/// What a round did and found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundResult {
    pub plan: RoundPlan,
    pub buyers: u64,
    pub accepted: u64,
    pub refused: u64,
    pub gave_up: u64,
    pub retries: u64,
    pub confirmed: u64,
    pub cancelled: u64,
    pub rejected: u64,
    pub units_sold: i64,
    /// Units unsold at rest although buyers were refused for good: a unit
    /// given back when the (bounded) line was already empty.
    #[serde(default)]
    pub unsold_after_refusals: u64,
    /// From the last fault's heal (or the crowd's last answer, if later)
    /// until lag was zero, every accepted purchase terminal and nothing
    /// reserved; `None`: not within `settle_within`.
    pub recovery_s: Option<f64>,
    /// What kept the pipeline from rest when the round ended, if anything.
    #[serde(default)]
    pub not_at_rest: Option<String>,
    pub violations: Vec<Violation>,
    /// Where the round's service logs were kept (failed rounds only).
    pub logs: Option<PathBuf>,
}

impl RoundResult {
    /// A round the campaign could not set up or finish.
    pub fn not_run(plan: RoundPlan, why: String) -> Self {
        Self {
            plan,
            buyers: 0,
            accepted: 0,
            refused: 0,
            gave_up: 0,
            retries: 0,
            confirmed: 0,
            cancelled: 0,
            rejected: 0,
            units_sold: 0,
            unsold_after_refusals: 0,
            recovery_s: None,
            not_at_rest: None,
            violations: vec![Violation::new(ViolationKind::Harness, why)],
            logs: None,
        }
    }

    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    pub fn count(&self, kind: ViolationKind) -> usize {
        self.violations.iter().filter(|v| v.kind == kind).count()
    }
}

/// The payment service's behaviour when no fault is on: some declines and
/// a long tail of slow payments, as a real processor has.
pub fn baseline_payment() -> StubBehaviour {
    StubBehaviour {
        decline_rate: 0.1,
        latency: LatencyModel::LogNormal {
            p50_ms: 20.0,
            p99_ms: 400.0,
        },
        error_rate: 0.0,
        timeout_rate: 0.0,
        // Past the order-worker's 2 s payment timeout: an ambiguous charge.
        hang_ms: 3_000,
        outage: false,
    }
}

/// The worker a fault acts on: the first of its kind (the second takes its
/// partitions when it is paused or killed).
fn target(part: Part) -> Instance {
    Instance::of(part, 0)
}

/// Injects `fault`, holds it for its time, and heals it; returns when the
/// heal began (a restarted process counts as healed when it is started,
/// not when it is ready: its way back is part of the recovery). Errors are
/// the campaign's own (a fault it could not inject or heal).
async fn inflict(world: &World, fault: &Planned) -> anyhow::Result<Instant> {
    match fault.kind {
        FaultKind::Kill(store @ (Part::Broker | Part::Redis | Part::Dynamodb)) => {
            world.kill_store(store).await?;
            tokio::time::sleep(fault.lasts).await;
            let healed = Instant::now();
            world.start_store(store).await?;
            Ok(healed)
        }
        FaultKind::Kill(part) => {
            let instance = target(part);
            world.kill(instance).await?;
            tokio::time::sleep(fault.lasts).await;
            let healed = Instant::now();
            world.restart(instance, None).await?;
            Ok(healed)
        }
        FaultKind::Pause(part) => {
            let instance = target(part);
            world.pause(instance).await?;
            tokio::time::sleep(fault.lasts).await;
            let healed = Instant::now();
            world.resume(instance).await?;
            Ok(healed)
        }
        FaultKind::Net(net, link) => {
            world.set_link(link, Some((net, fault.size)));
            tokio::time::sleep(fault.lasts).await;
            world.set_link(link, None);
            Ok(Instant::now())
        }
        FaultKind::Skew(part) => {
            // The second worker, so that a kill or pause of the first in
            // the same round does not undo it.
            let instance = Instance::of(part, 1);
            world.stop(instance).await?;
            world.restart(instance, Some(fault.size)).await?;
            tokio::time::sleep(fault.lasts).await;
            let healed = Instant::now();
            world.stop(instance).await?;
            world.restart(instance, None).await?;
            Ok(healed)
        }
        FaultKind::Payment(trouble) => {
            let mut behaviour = baseline_payment();
            match trouble {
                PaymentTrouble::Outage => behaviour.outage = true,
                PaymentTrouble::Timeouts => behaviour.timeout_rate = fault.size,
                PaymentTrouble::Slow => {
                    behaviour.latency = LatencyModel::Fixed {
                        ms: fault.size as u64,
                    }
                }
            }
            world.set_payment(&behaviour).await?;
            tokio::time::sleep(fault.lasts).await;
            let healed = Instant::now();
            world.set_payment(&baseline_payment()).await?;
            Ok(healed)
        }
    }
}

/// Runs one round on `world`.
pub async fn run(world: &World, plan: RoundPlan) -> anyhow::Result<RoundResult> {
    let sku = Sku::parse(&plan.sku).map_err(|e| anyhow::anyhow!("{e}"))?;
    let log_marks = log_sizes(world);
    world.ensure_stores().await?;
    world.set_payment(&baseline_payment()).await?;
    sale::create(
        &world.stores,
        &SaleSpec {
            sku: sku.clone(),
            stock: plan.stock,
            per_user_limit: 1,
            price_cents: 1_000,
            reservation_ttl: Duration::from_secs(20),
            starts_in: Duration::ZERO,
            duration: Duration::from_secs(3_600),
            overbook: 1.5,
        },
    )
    .await?;
    let mut violations = Vec::new();

    let start = Instant::now();
    let faults = futures::future::join_all(plan.faults.iter().map(|fault| async move {
        tokio::time::sleep_until(start + fault.at).await;
        (fault, inflict(world, fault).await)
    }));
    let prefix = format!("{}-b", plan.sku);
    let gateway = world.gateway_url();
    let (faults, (crowd, crowd_done)) = tokio::join!(faults, async {
        let crowd = crowd::run(&world.http, &gateway, sku.as_str(), &prefix, &plan.crowd).await;
        (crowd, Instant::now())
    });
    let mut healed = start;
    for (fault, outcome) in faults {
        match outcome {
            Ok(at) => healed = healed.max(at),
            Err(error) => {
                healed = Instant::now();
                violations.push(Violation::new(
                    ViolationKind::Harness,
                    format!("{}: {error:#}", fault.describe()),
                ));
            }
        }
    }
    // Whatever the faults did, the next round starts whole.
    world.proxies.heal_all();
    violations.extend(restart_the_dead(world).await);
    for wrong in &crowd.wrong_answers {
        violations.push(Violation::new(ViolationKind::WrongAnswer, wrong.clone()));
    }

    // Recovery counts from the heal, or from the last buyer's answer when
    // the crowd outlasted the fault: the purchases it brought after the
    // heal are not the fault's to settle.
    let recovery_from = healed.max(crowd_done);
    let settled = settle(world, &sku, &crowd, recovery_from + plan.settle_within).await;
    let recovery_s = settled
        .recovered_at
        .map(|at| at.saturating_duration_since(recovery_from).as_secs_f64());
    violations.extend(settled.violations);
    violations.extend(check_books(world, &sku, &crowd, &settled.told).await);

    let count =
        |state: PurchaseState| settled.told.values().filter(|s| s.status == state).count() as u64;
    let units_sold = world
        .stores
        .stock
        .status(&sku, flashsale_core::clock::now_ms())
        .await
        .ok()
        .flatten()
        .map_or(0, |s| s.levels.sold);
    // The design's last invariant (after a sale that demand exceeded, at
    // rest, every unit is sold) is measured, not enforced: the line is
    // bounded (`admit.lua`), so when more held units come back than
    // buyers wait, a unit stays unsold though buyers were told "sold out"
    // earlier. README, "Chaos", says when and why.
    let unsold_after_refusals = if crowd.refused > 0 && settled.recovered_at.is_some() {
        (plan.stock as i64 - units_sold).max(0) as u64
    } else {
        0
    };
    let mut result = RoundResult {
        buyers: crowd.buyers,
        accepted: crowd.accepted.len() as u64,
        refused: crowd.refused,
        gave_up: crowd.gave_up,
        retries: crowd.retries,
        confirmed: count(PurchaseState::Confirmed),
        cancelled: count(PurchaseState::Cancelled),
        rejected: count(PurchaseState::Rejected),
        units_sold,
        unsold_after_refusals,
        recovery_s,
        not_at_rest: settled.stuck.clone(),
        violations,
        logs: None,
        plan,
    };
    if !result.passed() {
        result.logs = Some(keep_logs(world, &result, &log_marks)?);
    }
    Ok(result)
}

/// Any service that exited on its own is a violation; it is started again
/// so the campaign goes on.
async fn restart_the_dead(world: &World) -> Vec<Violation> {
    let mut out = Vec::new();
    for (instance, why) in world.crashed().await {
        out.push(Violation::new(ViolationKind::Crashed, why));
        if let Err(e) = world.restart(instance, None).await {
            out.push(Violation::new(
                ViolationKind::Harness,
                format!("restarting {}: {e:#}", instance.name()),
            ));
        }
    }
    out
}

struct Settled {
    /// The last status the gateway gave for each accepted purchase.
    told: HashMap<String, PurchaseStatus>,
    recovered_at: Option<Instant>,
    violations: Vec<Violation>,
    /// Why the pipeline was not at rest when the round ended, if it was not.
    stuck: Option<String>,
}

/// Waits until every accepted purchase is terminal, the groups have no
/// lag and nothing is reserved, or `deadline`.
async fn settle(world: &World, sku: &Sku, crowd: &CrowdOutcome, deadline: Instant) -> Settled {
    let mut told: HashMap<String, PurchaseStatus> = HashMap::new();
    let last_gap = loop {
        let open: Vec<&str> = crowd
            .accepted
            .iter()
            .map(|a| a.request_id.as_str())
            .filter(|id| !told.get(*id).is_some_and(|s| s.status.is_terminal()))
            .collect();
        let answers: Vec<(String, Option<PurchaseStatus>)> = futures::stream::iter(open)
            .map(|id| async move { (id.to_owned(), status_of(world, id).await) })
            .buffer_unordered(16)
            .collect()
            .await;
        for (id, status) in answers {
            if let Some(status) = status {
                told.insert(id, status);
            }
        }
        let pending =
            crowd.accepted.len() - told.values().filter(|s| s.status.is_terminal()).count();
        let gap = if pending > 0 {
            format!("{pending} accepted purchases not terminal")
        } else {
            at_rest_gap(world, sku).await.unwrap_or_default()
        };
        if gap.is_empty() {
            return Settled {
                told,
                recovered_at: Some(Instant::now()),
                violations: Vec::new(),
                stuck: None,
            };
        }
        if Instant::now() >= deadline {
            break gap;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let mut violations = Vec::new();
    for accepted in &crowd.accepted {
        match told.get(&accepted.request_id) {
            Some(s) if s.status.is_terminal() => {}
            Some(s) => violations.push(Violation::new(
                ViolationKind::Lost,
                format!(
                    "{} (buyer {}): still {} when the round ended",
                    accepted.request_id,
                    accepted.user_id,
                    s.status.as_str()
                ),
            )),
            None => violations.push(Violation::new(
                ViolationKind::Lost,
                format!(
                    "{} (buyer {}): answered 202, unknown to the gateway",
                    accepted.request_id, accepted.user_id
                ),
            )),
        }
    }
    // Every purchase ended but the pipeline is not at rest (a group's lag
    // left, units reserved): it did not recover from the fault, which is
    // what the campaign is for (seed 7, round 22 was this).
    if violations.is_empty() {
        violations.push(Violation::new(
            ViolationKind::Unsettled,
            format!("not at rest when the round ended: {last_gap}"),
        ));
    }
    Settled {
        told,
        recovered_at: None,
        violations,
        stuck: Some(last_gap),
    }
}

/// What keeps the pipeline from being at rest (lag on a group, units
/// reserved), or `None` when it is.
async fn at_rest_gap(world: &World, sku: &Sku) -> Option<String> {
    match flashsale_cli::lag::read(&world.cli.kafka, &[], &[], false).await {
        Ok(groups) => {
            if let Some(g) = groups.iter().find(|g| g.total_lag != 0) {
                return Some(format!("group {} lags by {}", g.group, g.total_lag));
            }
        }
        Err(e) => return Some(format!("the lag cannot be read: {e}")),
    }
    match world
        .stores
        .stock
        .status(sku, flashsale_core::clock::now_ms())
        .await
    {
        Ok(Some(s)) if s.levels.reserved != 0 => {
            Some(format!("{} units reserved", s.levels.reserved))
        }
        Ok(Some(_)) => None,
        Ok(None) => Some("the sku is gone from Redis".to_owned()),
        Err(e) => Some(format!("Redis does not answer: {e}")),
    }
}

/// What the gateway tells the buyer about `id`, if it answers.
async fn status_of(world: &World, id: &str) -> Option<PurchaseStatus> {
    let url = format!("{}/v1/purchases/{id}", world.gateway_url());
    let response = world.http.get(&url).send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.json().await.ok()
}

/// The books at rest: the audit, and the buyer's word against the order's.
async fn check_books(
    world: &World,
    sku: &Sku,
    crowd: &CrowdOutcome,
    told: &HashMap<String, PurchaseStatus>,
) -> Vec<Violation> {
    let mut out = Vec::new();
    match world.stores.audit(sku, true).await {
        Ok(report) => {
            for (breach, text) in report.breaches.iter().zip(&report.violations) {
                out.push(Violation::new((*breach).into(), text.clone()));
            }
        }
        Err(e) => out.push(Violation::new(
            ViolationKind::Harness,
            format!("the audit could not run: {e}"),
        )),
    }
    let orders: Vec<Order> = match world.stores.inventory.get(sku).await {
        Ok(Some(sale)) => match world.stores.orders.of_sale(sku, &sale.rules.sale_id).await {
            Ok(orders) => orders,
            Err(e) => {
                out.push(Violation::new(
                    ViolationKind::Harness,
                    format!("orders: {e}"),
                ));
                return out;
            }
        },
        other => {
            out.push(Violation::new(
                ViolationKind::Harness,
                format!("the sale cannot be read: {other:?}"),
            ));
            return out;
        }
    };
    let by_id: HashMap<String, &Order> =
        orders.iter().map(|o| (o.order_id.to_string(), o)).collect();
    // Every accepted purchase the buyer was told about...
    for accepted in &crowd.accepted {
        let Some(status) = told.get(&accepted.request_id) else {
            continue;
        };
        if !status.status.is_terminal() {
            continue;
        }
        let order = by_id.get(&accepted.request_id).map(|o| o.status);
        if let Some(why) = mismatch(status.status, order) {
            out.push(Violation::new(
                ViolationKind::StatusMismatch,
                format!("{}: {why}", accepted.request_id),
            ));
        }
    }
    // A buyer told no for good must not have a purchase going on: the
    // same buyer and key name the same purchase (`RequestId::derive`).
    let mut told_no: HashMap<String, (&str, &str)> = HashMap::new();
    for (user, kind) in &crowd.refused_buyers {
        if let (Ok(u), Ok(k)) = (UserId::parse(user), IdempotencyKey::parse(user)) {
            told_no.insert(RequestId::derive(&u, &k).to_string(), (user, kind));
        }
    }
    for order in &orders {
        let id = order.order_id.to_string();
        if let Some((user, kind)) = told_no.get(&id) {
            out.push(Violation::new(
                ViolationKind::StatusMismatch,
                format!(
                    "{id}: buyer {user} was refused for good ({kind}) but the purchase went on: its order is {}",
                    order.status
                ),
            ));
        }
    }
    // ...and every order, the ones whose 202 a killed gateway never sent
    // included.
    for order in &orders {
        let id = order.order_id.to_string();
        if crowd.accepted.iter().any(|a| a.request_id == id) || told_no.contains_key(&id) {
            continue;
        }
        let status = match told.get(&id) {
            Some(s) => Some(s.clone()),
            None => status_of(world, &id).await,
        };
        match status {
            Some(s) => {
                if let Some(why) = mismatch(s.status, Some(order.status)) {
                    out.push(Violation::new(
                        ViolationKind::StatusMismatch,
                        format!("{id}: {why}"),
                    ));
                }
            }
            None => out.push(Violation::new(
                ViolationKind::StatusMismatch,
                format!(
                    "{id}: an order {} the gateway knows nothing of",
                    order.status
                ),
            )),
        }
    }
    out
}

/// Whether what the buyer is told (`told`) contradicts the order.
fn mismatch(told: PurchaseState, order: Option<OrderStatus>) -> Option<String> {
    let consistent = match (told, order) {
        (PurchaseState::Confirmed, Some(OrderStatus::Confirmed)) => true,
        // Cancelled before an order was put (the reservation expired in
        // the shop-worker's hands), or after.
        (PurchaseState::Cancelled, None | Some(OrderStatus::Cancelled)) => true,
        (PurchaseState::Rejected, None) => true,
        // Not terminal yet: the settle step reports it.
        (state, _) if !state.is_terminal() => true,
        _ => false,
    };
    (!consistent).then(|| {
        format!(
            "the buyer is told {} but the order is {}",
            told.as_str(),
            order.map_or("absent".to_owned(), |o| o.to_string())
        )
    })
}

/// Every service log's size now, to keep what a round adds.
fn log_sizes(world: &World) -> Vec<(Instance, u64)> {
    INSTANCES
        .iter()
        .map(|i| {
            let size = std::fs::metadata(world.log_path(*i)).map_or(0, |m| m.len());
            (*i, size)
        })
        .collect()
}

/// Copies what each service logged during the round, with the round's
/// plan and violations, to `rounds/<index>/`.
fn keep_logs(
    world: &World,
    result: &RoundResult,
    marks: &[(Instance, u64)],
) -> anyhow::Result<PathBuf> {
    use std::io::{Read, Seek, SeekFrom};
    let dir = world
        .config
        .state_dir
        .join("rounds")
        .join(result.plan.index.to_string());
    std::fs::create_dir_all(&dir)?;
    for (instance, from) in marks {
        let mut file = std::fs::File::open(world.log_path(*instance))?;
        file.seek(SeekFrom::Start(*from))?;
        let mut text = Vec::new();
        file.read_to_end(&mut text)?;
        std::fs::write(dir.join(format!("{}.log", instance.name())), text)?;
    }
    std::fs::write(dir.join("round.json"), serde_json::to_vec_pretty(result)?)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_buyers_word_against_the_order() {
        use OrderStatus as O;
        use PurchaseState as P;
        assert_eq!(mismatch(P::Confirmed, Some(O::Confirmed)), None);
        assert_eq!(mismatch(P::Cancelled, Some(O::Cancelled)), None);
        assert_eq!(mismatch(P::Cancelled, None), None);
        assert_eq!(mismatch(P::Rejected, None), None);
        assert!(mismatch(P::Confirmed, Some(O::Cancelled)).is_some());
        assert!(mismatch(P::Confirmed, None).is_some());
        assert!(mismatch(P::Cancelled, Some(O::Confirmed)).is_some());
        assert!(mismatch(P::Rejected, Some(O::Confirmed)).is_some());
        assert!(mismatch(P::Confirmed, Some(O::Pending)).is_some());
    }
}
