//! The invariants of DESIGN.md, checked across Redis, DynamoDB and the
//! payment service. `check` is pure (what the three hold in, violations
//! out); `gather` reads them.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use flashsale_core::dynamo::inventory::{InventoryStore, Sale};
use flashsale_core::dynamo::orders::{Order, OrderStatus, OrderStore};
use flashsale_core::ids::Sku;
use flashsale_core::payment::{Charge, ChargeStatus, PaymentClient};
use flashsale_core::stock::{StockLevels, StockStore};

/// Everything the audit of one sku looks at.
#[derive(Debug, Clone)]
pub struct Evidence {
    pub sku: Sku,
    pub redis: Option<StockLevels>,
    pub sale: Option<Sale>,
    pub orders: Vec<Order>,
    pub charges: Vec<Charge>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub sku: String,
    pub total: i64,
    pub available: i64,
    pub reserved: i64,
    pub sold: i64,
    pub confirmed_orders: usize,
    pub cancelled_orders: usize,
    pub open_orders: usize,
    pub violations: Vec<String>,
    /// What each violation breaks, in the same order.
    pub breaches: Vec<Breach>,
}

/// Which promise a violation breaks, for reports that count them by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Breach {
    /// More units sold than the sale had.
    Oversold,
    /// A purchase charged more than once.
    DoubleCharged,
    /// A charge kept on an order that is not confirmed.
    Unrefunded,
    /// A confirmed order without its charge, or with it refunded.
    WrongMoney,
    /// Units still reserved, or an order half-way, at rest.
    Unsettled,
    /// The stores disagree on the books (totals, sold counts, sale ids).
    Books,
}

impl Breach {
    pub fn name(self) -> &'static str {
        match self {
            Self::Oversold => "oversold",
            Self::DoubleCharged => "double-charged",
            Self::Unrefunded => "unrefunded",
            Self::WrongMoney => "wrong-money",
            Self::Unsettled => "unsettled",
            Self::Books => "books",
        }
    }
}

/// The violations found so far, each with the promise it breaks.
#[derive(Default)]
struct Found(Vec<(Breach, String)>);

impl Found {
    fn push(&mut self, breach: Breach, text: String) {
        self.0.push((breach, text));
    }
}

impl Report {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// One line for an operator, then the violations, one per line.
    pub fn human(&self) -> String {
        let mut text = format!(
            "{}: total {} available {} reserved {} sold {} | orders confirmed {} cancelled {} open {} | {}\n",
            self.sku,
            self.total,
            self.available,
            self.reserved,
            self.sold,
            self.confirmed_orders,
            self.cancelled_orders,
            self.open_orders,
            if self.ok() { "clean" } else { "VIOLATIONS" }
        );
        for violation in &self.violations {
            text.push_str(&format!("  - {violation}\n"));
        }
        text
    }
}

/// The verdict over several skus' reports: clean only if every one is.
pub fn all_clean(reports: &[Report]) -> bool {
    reports.iter().all(Report::ok)
}

/// Checks every invariant. `at_rest` adds the ones that hold only once the
/// sale has settled: nothing reserved, no order half-way.
pub fn check(evidence: &Evidence, at_rest: bool) -> Report {
    let mut v = Found::default();
    let sku = evidence.sku.as_str();
    let zero = StockLevels {
        sale_id: String::new(),
        total: 0,
        available: 0,
        reserved: 0,
        sold: 0,
        sold_out: false,
    };
    let redis = evidence.redis.as_ref().unwrap_or(&zero);
    let count = |status: OrderStatus| {
        evidence
            .orders
            .iter()
            .filter(|o| o.status == status)
            .count()
    };
    let report = |found: Found| Report {
        sku: sku.to_owned(),
        total: redis.total,
        available: redis.available,
        reserved: redis.reserved,
        sold: redis.sold,
        confirmed_orders: count(OrderStatus::Confirmed),
        cancelled_orders: count(OrderStatus::Cancelled),
        open_orders: count(OrderStatus::Pending),
        violations: found.0.iter().map(|(_, text)| text.clone()).collect(),
        breaches: found.0.iter().map(|(breach, _)| *breach).collect(),
    };
    let (Some(_), Some(sale)) = (&evidence.redis, &evidence.sale) else {
        if evidence.redis.is_none() {
            v.push(Breach::Books, format!("{sku}: no stock in Redis"));
        }
        if evidence.sale.is_none() {
            v.push(
                Breach::Books,
                format!("{sku}: no sale in the DynamoDB inventory table"),
            );
        }
        return report(v);
    };

    if redis.sale_id != sale.rules.sale_id {
        v.push(
            Breach::Books,
            format!(
                "{sku}: Redis holds sale {} but DynamoDB holds sale {}",
                redis.sale_id, sale.rules.sale_id
            ),
        );
    }
    for (name, value) in [
        ("available", redis.available),
        ("reserved", redis.reserved),
        ("sold", redis.sold),
    ] {
        if value < 0 {
            v.push(
                Breach::Books,
                format!("{sku}: Redis {name} is negative ({value})"),
            );
        }
    }
    if redis.available + redis.reserved + redis.sold != redis.total {
        v.push(
            Breach::Books,
            format!(
                "{sku}: available {} + reserved {} + sold {} != total {} in Redis",
                redis.available, redis.reserved, redis.sold, redis.total
            ),
        );
    }
    if redis.total != sale.rules.total as i64 {
        v.push(
            Breach::Books,
            format!(
                "{sku}: total is {} in Redis but {} in DynamoDB",
                redis.total, sale.rules.total
            ),
        );
    }
    if redis.sold > redis.total || sale.sold > sale.rules.total {
        v.push(
            Breach::Oversold,
            format!(
                "{sku}: OVERSOLD: sold {} (Redis) / {} (DynamoDB) of {}",
                redis.sold, sale.sold, sale.rules.total
            ),
        );
    }
    let confirmed_units: u64 = evidence
        .orders
        .iter()
        .filter(|o| o.status == OrderStatus::Confirmed)
        .map(|o| u64::from(o.quantity.get()))
        .sum();
    if !(redis.sold as u64 == sale.sold && sale.sold == confirmed_units) {
        v.push(
            Breach::Books,
            format!(
                "{sku}: sold differs: Redis {}, DynamoDB inventory {}, confirmed orders {}",
                redis.sold, sale.sold, confirmed_units
            ),
        );
    }

    check_charges(evidence, &mut v);

    if at_rest {
        if redis.reserved != 0 {
            v.push(
                Breach::Unsettled,
                format!("{sku}: {} units still reserved at rest", redis.reserved),
            );
        }
        for order in &evidence.orders {
            if !order.status.is_terminal() {
                v.push(
                    Breach::Unsettled,
                    format!("order {}: still {} at rest", order.order_id, order.status),
                );
            }
        }
    }
    report(v)
}

fn check_charges(evidence: &Evidence, v: &mut Found) {
    let orders: HashMap<String, &Order> = evidence
        .orders
        .iter()
        .map(|o| (o.order_id.to_string(), o))
        .collect();
    let mut successful: HashMap<&str, Vec<&Charge>> = HashMap::new();
    for charge in &evidence.charges {
        if charge.status == ChargeStatus::Succeeded {
            successful
                .entry(charge.metadata.order_id.as_str())
                .or_default()
                .push(charge);
        }
    }
    for (order_id, charges) in &successful {
        if charges.len() > 1 {
            v.push(
                Breach::DoubleCharged,
                format!("order {order_id}: charged {} times", charges.len()),
            );
        }
        for charge in charges {
            let confirmed_here = orders.get(*order_id).is_some_and(|o| {
                o.status == OrderStatus::Confirmed && o.payment_id.as_deref() == Some(&charge.id)
            });
            if !confirmed_here && !charge.refunded {
                v.push(Breach::Unrefunded, format!(
                    "charge {} of order {order_id}: taken but the order is not confirmed, and not refunded",
                    charge.id
                ));
            }
            if confirmed_here && charge.refunded {
                v.push(
                    Breach::WrongMoney,
                    format!(
                        "charge {} of order {order_id}: refunded although the order is confirmed",
                        charge.id
                    ),
                );
            }
        }
    }
    for order in evidence
        .orders
        .iter()
        .filter(|o| o.status == OrderStatus::Confirmed)
    {
        let id = order.order_id.to_string();
        let paid = successful.get(id.as_str()).is_some_and(|c| {
            c.iter()
                .any(|c| !c.refunded && c.amount_cents == order.amount_cents)
        });
        if !paid {
            v.push(
                Breach::WrongMoney,
                format!(
                    "order {id}: confirmed without a successful charge of {} cents",
                    order.amount_cents
                ),
            );
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatherError {
    #[error(transparent)]
    Redis(#[from] flashsale_core::stock::StockError),
    #[error(transparent)]
    Dynamo(#[from] flashsale_core::dynamo::DynamoError),
    #[error(transparent)]
    Payment(#[from] flashsale_core::payment::PaymentError),
}

/// Reads what the audit of `sku` needs from the three stores.
pub async fn gather(
    sku: &Sku,
    stock: &StockStore,
    inventory: &InventoryStore,
    orders: &OrderStore,
    payment: &PaymentClient,
) -> Result<Evidence, GatherError> {
    let redis = stock.levels(sku).await?;
    let sale = inventory.get(sku).await?;
    let (orders, charges) = match &sale {
        Some(sale) => (
            orders.of_sale(sku, &sale.rules.sale_id).await?,
            payment.charges_of_sale(&sale.rules.sale_id).await?,
        ),
        None => (Vec::new(), Vec::new()),
    };
    Ok(Evidence {
        sku: sku.clone(),
        redis,
        sale,
        orders,
        charges,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flashsale_core::ids::{Quantity, RequestId, UserId};
    use flashsale_core::payment::ChargeMetadata;
    use flashsale_core::stock::SaleRules;

    fn sale(total: u64, sold: u64) -> Sale {
        Sale {
            sku: Sku::parse("s").unwrap(),
            sold,
            closed: false,
            rules: SaleRules {
                sale_id: "sale-1".into(),
                total,
                per_user_limit: 1,
                price_cents: 100,
                reservation_ttl_ms: 1000,
                starts_at_ms: 0,
                ends_at_ms: u64::MAX,
                overbook: 1.5,
            },
        }
    }

    fn levels(total: i64, available: i64, reserved: i64, sold: i64) -> StockLevels {
        StockLevels {
            sale_id: "sale-1".into(),
            total,
            available,
            reserved,
            sold,
            sold_out: available == 0,
        }
    }

    fn order(status: OrderStatus, payment_id: Option<&str>) -> Order {
        Order {
            order_id: RequestId::fresh(),
            sku: Sku::parse("s").unwrap(),
            sale_id: "sale-1".into(),
            user_id: UserId::parse("u").unwrap(),
            quantity: Quantity::new(1).unwrap(),
            amount_cents: 100,
            status,
            reason: None,
            payment_id: payment_id.map(str::to_owned),
            expires_at_ms: 0,
            created_at_ms: 0,
            updated_at_ms: 0,
            paid_at_ms: None,
            confirmed_at_ms: None,
            cancelled_at_ms: None,
        }
    }

    fn charge(order: &Order, id: &str, status: ChargeStatus, refunded: bool) -> Charge {
        Charge {
            id: id.into(),
            idempotency_key: order.order_id.to_string(),
            amount_cents: 100,
            currency: "EUR".into(),
            status,
            refunded,
            metadata: ChargeMetadata {
                order_id: order.order_id.to_string(),
                sku: "s".into(),
                sale_id: "sale-1".into(),
            },
            created_at_ms: 0,
        }
    }

    fn evidence(
        redis: StockLevels,
        sale: Sale,
        orders: Vec<Order>,
        charges: Vec<Charge>,
    ) -> Evidence {
        Evidence {
            sku: Sku::parse("s").unwrap(),
            redis: Some(redis),
            sale: Some(sale),
            orders,
            charges,
        }
    }

    #[test]
    fn a_settled_sale_is_clean() {
        let confirmed = order(OrderStatus::Confirmed, Some("ch_1"));
        let cancelled = order(OrderStatus::Cancelled, Some("ch_2"));
        let charges = vec![
            charge(&confirmed, "ch_1", ChargeStatus::Succeeded, false),
            charge(&cancelled, "ch_2", ChargeStatus::Succeeded, true),
        ];
        let report = check(
            &evidence(
                levels(2, 1, 0, 1),
                sale(2, 1),
                vec![confirmed, cancelled],
                charges,
            ),
            true,
        );
        assert!(report.ok(), "{:?}", report.violations);
        assert_eq!(report.confirmed_orders, 1);
    }

    #[test]
    fn the_verdict_is_clean_only_if_every_sku_is() {
        let clean = check(
            &evidence(levels(2, 2, 0, 0), sale(2, 0), vec![], vec![]),
            true,
        );
        let broken = check(
            &evidence(levels(2, 1, 0, 0), sale(2, 0), vec![], vec![]),
            true,
        );
        assert!(all_clean(std::slice::from_ref(&clean)));
        assert!(!all_clean(&[clean.clone(), broken.clone()]));
        assert!(all_clean(&[]), "nothing to audit is no violation");
        assert!(clean.human().ends_with("| clean\n"), "{}", clean.human());
        let text = broken.human();
        assert!(text.contains("| VIOLATIONS\n  - "), "{text}");
    }

    #[test]
    fn each_broken_invariant_is_reported() {
        let confirmed = order(OrderStatus::Confirmed, Some("ch_1"));
        let cases: Vec<(Evidence, &str)> = vec![
            (
                evidence(levels(2, 1, 0, 0), sale(2, 0), vec![], vec![]),
                "!= total",
            ),
            (
                evidence(levels(1, -1, 0, 2), sale(1, 2), vec![], vec![]),
                "OVERSOLD",
            ),
            (
                evidence(levels(2, 1, 0, 1), sale(2, 0), vec![], vec![]),
                "sold differs",
            ),
            (
                evidence(levels(2, 1, 1, 0), sale(2, 0), vec![], vec![]),
                "still reserved",
            ),
            (
                evidence(
                    levels(2, 1, 0, 1),
                    sale(2, 1),
                    vec![confirmed.clone()],
                    vec![],
                ),
                "without a successful charge",
            ),
            (
                evidence(
                    levels(2, 1, 0, 1),
                    sale(2, 1),
                    vec![confirmed.clone()],
                    vec![
                        charge(&confirmed, "ch_1", ChargeStatus::Succeeded, false),
                        charge(&confirmed, "ch_9", ChargeStatus::Succeeded, false),
                    ],
                ),
                "charged 2 times",
            ),
            (
                evidence(
                    levels(2, 2, 0, 0),
                    sale(2, 0),
                    vec![order(OrderStatus::Cancelled, None)],
                    vec![charge(&confirmed, "ch_1", ChargeStatus::Succeeded, false)],
                ),
                "not refunded",
            ),
            (
                evidence(
                    levels(2, 2, 0, 0),
                    sale(2, 0),
                    vec![order(OrderStatus::Pending, None)],
                    vec![],
                ),
                "at rest",
            ),
        ];
        for (evidence, expected) in cases {
            let report = check(&evidence, true);
            assert!(
                report.violations.iter().any(|v| v.contains(expected)),
                "expected {expected:?} in {:?}",
                report.violations
            );
        }
    }
}
