//! What a test asserts with: waiting on a condition with a deadline, and
//! the books of a sale checked across every store.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: a failure is the test's answer

use std::future::Future;
use std::time::Duration;

use flashsale_core::ids::Sku;

use crate::Pipeline;

impl Pipeline {
    /// A sale as DynamoDB holds it, its orders, and every charge the
    /// payment service made for it.
    pub async fn sale_books(
        &self,
        sku: &Sku,
    ) -> anyhow::Result<(
        flashsale_core::dynamo::inventory::Sale,
        Vec<flashsale_core::dynamo::orders::Order>,
        Vec<flashsale_core::payment::Charge>,
    )> {
        let sale = self
            .stores
            .inventory
            .get(sku)
            .await?
            .ok_or_else(|| anyhow::anyhow!("{sku} has no sale"))?;
        let orders = self.stores.orders.of_sale(sku, &sale.rules.sale_id).await?;
        let charges = self
            .stores
            .payment
            .charges_of_sale(&sale.rules.sale_id)
            .await?;
        Ok((sale, orders, charges))
    }

    /// What the stub and DynamoDB say about a sale, checked: no order was
    /// charged twice, a charge was kept exactly on the confirmed orders,
    /// every order is at rest, and the audit is clean. The orders by status.
    pub async fn money_adds_up(
        &self,
        sku: &Sku,
    ) -> std::collections::HashMap<flashsale_core::dynamo::orders::OrderStatus, usize> {
        use flashsale_core::dynamo::orders::OrderStatus;
        use flashsale_core::payment::ChargeStatus;
        let (_, orders, charges) = self.sale_books(sku).await.expect("the sale's books");
        let mut per_order: std::collections::HashMap<&str, Vec<_>> = Default::default();
        for charge in &charges {
            per_order
                .entry(charge.metadata.order_id.as_str())
                .or_default()
                .push(charge);
        }
        let mut by_status = std::collections::HashMap::new();
        for order in &orders {
            *by_status.entry(order.status).or_default() += 1;
            let id = order.order_id.to_string();
            let made = per_order.remove(id.as_str()).unwrap_or_default();
            assert!(made.len() <= 1, "{id} charged {} times", made.len());
            let kept = made
                .iter()
                .filter(|c| c.status == ChargeStatus::Succeeded && !c.refunded)
                .count();
            match order.status {
                OrderStatus::Confirmed => {
                    assert_eq!(kept, 1, "confirmed {id} without a kept charge: {made:?}")
                }
                OrderStatus::Cancelled => assert_eq!(kept, 0, "cancelled {id} kept {made:?}"),
                other => panic!("{id} is still {other} at rest"),
            }
        }
        assert!(
            per_order.is_empty(),
            "charges without an order: {per_order:?}"
        );
        let audit = self.stores.audit(sku, true).await.expect("the audit runs");
        assert!(audit.ok(), "{:?}", audit.violations);
        by_status
    }
}

/// Polls `check` until it returns `Some`, or fails after `deadline`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll_until(what, deadline, || {
        let checked = check();
        async move { checked.await.ok_or(None) }
    })
    .await
}

/// Reads `read` until what it read is `wanted`, or fails after `deadline`
/// naming the last reading: a failure in CI, where only part of the output
/// is kept, then says what the test saw instead.
pub async fn eventually_reads<T, F, Fut>(
    what: &str,
    deadline: Duration,
    mut read: F,
    wanted: impl Fn(&T) -> bool,
) -> T
where
    T: std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    poll_until(what, deadline, || {
        let reading = read();
        let wanted = &wanted;
        async move {
            let value = reading.await;
            if wanted(&value) {
                Ok(value)
            } else {
                Err(Some(format!("{value:?}")))
            }
        }
    })
    .await
}

/// Polls `check` until it returns `Ok`; `Err` carries what was seen instead,
/// if it can be shown.
async fn poll_until<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Option<String>>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        let seen = match check().await {
            Ok(value) => return value,
            Err(seen) => seen,
        };
        assert!(
            tokio::time::Instant::now() < until,
            "timed out after {deadline:?} waiting for {what}{}",
            seen.map(|s| format!(" (last read: {s})"))
                .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
