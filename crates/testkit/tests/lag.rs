//! `flashsale lag` against the real broker: a backlog that builds while no
//! shop-worker runs, its age, and the member that takes it over and drains
//! it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure here is the test's answer

use std::time::Duration;

use flashsale_testkit::flashsale_cli::lag;
use flashsale_testkit::{Pipeline, PipelineOptions, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lag_shows_the_backlog_its_age_and_who_drains_it() {
    let p = Pipeline::start(PipelineOptions {
        shop_workers: 0,
        order_workers: 0,
        ..Default::default()
    })
    .await
    .expect("pipeline starts");
    let sku = p.sku("lag");
    p.create_sale(&sku, 100, 1).await.unwrap();
    for n in 0..6 {
        let answer = p
            .post_purchase(
                &p.gateway_url,
                sku.as_str(),
                &format!("{}-l{n}", p.prefix),
                None,
            )
            .await
            .unwrap();
        assert_eq!(answer.status, 202, "{answer:?}");
    }

    let groups = lag::read(&p.kafka, &[], &[], false)
        .await
        .expect("lag read");
    let (shop, orders) = (&groups[0], &groups[1]);
    assert!(shop.group.ends_with("flashsale-shop"), "{shop:?}");
    assert_eq!(shop.total_lag, 6, "{shop:?}");
    assert!(shop.members.is_empty(), "{shop:?}");
    // Not described: tansu 0.6 cannot, and `--members` is off by default.
    assert_eq!(shop.state, "not asked");
    assert!(
        shop.max_lag_seconds
            .is_some_and(|s| (0.0..60.0).contains(&s)),
        "{shop:?}"
    );
    assert!(
        shop.partitions
            .iter()
            .all(|part| part.owner.is_none() && part.committed.is_none())
    );
    assert_eq!(orders.total_lag, 0, "{orders:?}");
    let table = lag::human(&groups);
    assert!(
        table.contains(&shop.group) && table.contains("lag 6 messages"),
        "{table}"
    );
    let json = serde_json::to_value(&groups).unwrap();
    assert_eq!(json[0]["total_lag"], 6);

    // A shop-worker joins and drains the backlog: every partition with
    // records is committed to its end.
    p.add_shop_worker().await.unwrap();
    let drained = eventually("the backlog drained", Duration::from_secs(60), || async {
        let groups = lag::read(&p.kafka, &[], &[], false).await.ok()?;
        let shop = groups.into_iter().next()?;
        (shop.total_lag == 0).then_some(shop)
    })
    .await;
    assert!(
        drained
            .partitions
            .iter()
            .all(|part| part.committed.unwrap_or(0) == part.end_offset),
        "{drained:?}"
    );
    assert_eq!(drained.max_lag_seconds, None);
    p.stop().await;
}
