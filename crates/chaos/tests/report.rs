//! The campaign's report, from rounds made up here: the table counts what
//! the rounds found, and the HTML page renders in a real browser.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure here is the test's answer

use std::time::Duration;

use flashsale_chaos::CampaignOptions;
use flashsale_chaos::crowd::CrowdPlan;
use flashsale_chaos::fault::{FaultKind, Part};
use flashsale_chaos::report::{self, Campaign};
use flashsale_chaos::round::{RoundResult, Violation, ViolationKind};

fn options(kinds: Vec<FaultKind>) -> CampaignOptions {
    CampaignOptions {
        seed: 5,
        rounds: 3,
        kinds,
        one_each: true,
        max_per_round: 1,
        stock: 10,
        crowd: CrowdPlan {
            burst: 5,
            rate: 2.0,
            rate_for: Duration::from_secs(4),
            patience: Duration::from_secs(10),
        },
        settle_within: Duration::from_secs(30),
        replay: "scripts/chaos --short --seed 5".into(),
        only_round: None,
    }
}

fn round(
    options: &CampaignOptions,
    index: u64,
    recovery_s: Option<f64>,
    violations: Vec<Violation>,
) -> RoundResult {
    let mut r = RoundResult::not_run(
        flashsale_chaos::plan_round(options, index, "t"),
        String::new(),
    );
    r.violations = violations;
    r.accepted = 10;
    r.recovery_s = recovery_s;
    r
}

fn campaign() -> Campaign {
    let kill = FaultKind::Kill(Part::Redis);
    let pause = FaultKind::Pause(Part::OrderWorker);
    let options = options(vec![kill, pause, kill]);
    let lost = Violation {
        kind: ViolationKind::Lost,
        text: "r-1 (buyer b-1): still reserved when the round ended".into(),
    };
    let twice = Violation {
        kind: ViolationKind::DoubleCharged,
        text: "order r-2: charged 2 times <b>".into(),
    };
    let rounds = vec![
        round(&options, 0, Some(1.0), vec![]),
        round(&options, 1, None, vec![lost, twice]),
        round(&options, 2, Some(3.0), vec![]),
    ];
    Campaign {
        seed: options.seed,
        replay: options.replay.clone(),
        duration_s: 12.0,
        summary: report::summarize(&rounds),
        rounds,
    }
}

#[test]
fn the_table_counts_what_each_kind_of_round_found() {
    let campaign = campaign();
    assert!(!campaign.passed());
    let kill = &campaign.summary[0];
    assert_eq!(kill.kind, FaultKind::Kill(Part::Redis));
    assert_eq!((kill.rounds, kill.accepted, kill.failed_rounds), (2, 20, 0));
    assert_eq!(kill.recovery_p50_s, Some(1.0));
    assert_eq!(kill.recovery_max_s, Some(3.0));
    let pause = &campaign.summary[1];
    assert_eq!(pause.kind, FaultKind::Pause(Part::OrderWorker));
    assert_eq!(pause.failed_rounds, 1);
    assert_eq!(pause.count(ViolationKind::Lost), 1);
    assert_eq!(pause.count(ViolationKind::DoubleCharged), 1);
    assert_eq!(pause.not_recovered, 1);
    let table = campaign.human();
    assert!(table.contains("kill-redis"), "{table}");
    assert!(table.contains("round 1 FAILED (seed 5"), "{table}");
    assert!(table.contains("fault: pause-order-worker at"), "{table}");
    assert!(table.contains("lost: r-1"), "{table}");
    assert!(
        table.contains("replay with: scripts/chaos --short --seed 5"),
        "{table}"
    );
}

#[test]
fn the_html_page_renders_its_table_and_failed_rounds_in_a_browser() {
    let campaign = campaign();
    let dir = std::env::temp_dir().join(format!("chaos-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let page = dir.join("chaos.html");
    std::fs::write(&page, report::html(&campaign)).unwrap();
    let dom = flashsale_testkit::dom_in_chromium(&page).unwrap();
    assert!(dom.contains("id=\"summary\""), "{dom}");
    // A row per kind: its name, then its cells.
    assert_eq!(dom.matches("</th><td>").count(), 2, "{dom}");
    assert!(dom.contains("1 of 3 rounds broke a promise"), "{dom}");
    // Escaped, so a violation's text cannot break the page.
    assert!(dom.contains("charged 2 times &lt;b&gt;"), "{dom}");
    assert_eq!(dom.matches("<svg").count(), 2, "{dom}");
    let _ = std::fs::remove_dir_all(&dir);
}
