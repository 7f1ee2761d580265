//! The campaign's report: per fault kind, the rounds run, the purchases
//! accepted, the violations by the promise they break, and how long the
//! pipeline took to recover; as a table, as JSON, and as an HTML page.

use serde::{Deserialize, Serialize};

use crate::fault::FaultKind;
use crate::round::{RoundResult, ViolationKind};

/// A whole campaign: what was asked, and every round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Campaign {
    pub seed: u64,
    /// The command line that replays it.
    pub replay: String,
    pub duration_s: f64,
    pub rounds: Vec<RoundResult>,
    pub summary: Vec<KindRow>,
}

/// One fault kind's line of the report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KindRow {
    pub kind: FaultKind,
    pub rounds: u64,
    pub failed_rounds: u64,
    pub accepted: u64,
    /// Violations by kind, in `ViolationKind::ALL`'s order, zeros left out.
    pub violations: Vec<(ViolationKind, u64)>,
    /// Time to recover after the heal, over the rounds that recovered.
    pub recovery_p50_s: Option<f64>,
    pub recovery_max_s: Option<f64>,
    /// Rounds that did not recover within their settle time.
    pub not_recovered: u64,
    /// Units left unsold at rest though buyers had been refused, over the
    /// kind's rounds (measured, not a violation: see `RoundResult`).
    #[serde(default)]
    pub unsold_after_refusals: u64,
}

impl KindRow {
    pub fn count(&self, kind: ViolationKind) -> u64 {
        self.violations
            .iter()
            .find(|(k, _)| *k == kind)
            .map_or(0, |(_, n)| *n)
    }
}

/// A row per kind that any round injected, in `FaultKind::all()`'s order.
pub fn summarize(rounds: &[RoundResult]) -> Vec<KindRow> {
    FaultKind::all()
        .into_iter()
        .filter_map(|kind| {
            let of_kind: Vec<&RoundResult> = rounds
                .iter()
                .filter(|r| r.plan.faults.iter().any(|f| f.kind == kind))
                .collect();
            if of_kind.is_empty() {
                return None;
            }
            let violations = ViolationKind::ALL
                .iter()
                .map(|v| (*v, of_kind.iter().map(|r| r.count(*v) as u64).sum()))
                .filter(|(_, n)| *n > 0)
                .collect();
            let mut recoveries: Vec<f64> = of_kind.iter().filter_map(|r| r.recovery_s).collect();
            recoveries.sort_by(f64::total_cmp);
            Some(KindRow {
                kind,
                rounds: of_kind.len() as u64,
                failed_rounds: of_kind.iter().filter(|r| !r.passed()).count() as u64,
                accepted: of_kind.iter().map(|r| r.accepted).sum(),
                violations,
                recovery_p50_s: recoveries
                    .get(recoveries.len().saturating_sub(1) / 2)
                    .copied(),
                recovery_max_s: recoveries.last().copied(),
                not_recovered: of_kind.iter().filter(|r| r.recovery_s.is_none()).count() as u64,
                unsold_after_refusals: of_kind.iter().map(|r| r.unsold_after_refusals).sum(),
            })
        })
        .collect()
}

/// The columns of the table: the promises, in the words.
const COLUMNS: [(ViolationKind, &str); 6] = [
    (ViolationKind::Lost, "lost"),
    (ViolationKind::Oversold, "oversold"),
    (ViolationKind::DoubleCharged, "2x charged"),
    (ViolationKind::Unrefunded, "unrefunded"),
    (ViolationKind::StatusMismatch, "mismatch"),
    (ViolationKind::Unsettled, "other"),
];

/// Violations of the kinds without a column of their own.
fn others(row: &KindRow) -> u64 {
    row.violations
        .iter()
        .filter(|(k, _)| !COLUMNS[..5].iter().any(|(c, _)| c == k))
        .map(|(_, n)| n)
        .sum()
}

fn cell(row: &KindRow, column: usize) -> u64 {
    if column == 5 {
        others(row)
    } else {
        row.count(COLUMNS[column].0)
    }
}

fn seconds(s: Option<f64>) -> String {
    s.map_or("-".to_owned(), |s| format!("{s:.1}s"))
}

impl Campaign {
    pub fn passed(&self) -> bool {
        self.rounds.iter().all(RoundResult::passed)
    }

    /// The table a person reads on the terminal, then each failed round.
    pub fn human(&self) -> String {
        let mut out = format!(
            "{:<22} {:>6} {:>8} {:>5} {:>8} {:>10} {:>10} {:>8} {:>6} {:>9} {:>9}\n",
            "fault",
            "rounds",
            "accepted",
            "lost",
            "oversold",
            "2x charged",
            "unrefunded",
            "mismatch",
            "other",
            "recov p50",
            "recov max"
        );
        for row in &self.summary {
            let mut line = format!(
                "{:<22} {:>6} {:>8}",
                row.kind.to_string(),
                row.rounds,
                row.accepted
            );
            for (column, width) in [5, 8, 10, 10, 8, 6].iter().enumerate() {
                line.push_str(&format!(" {:>w$}", cell(row, column), w = width));
            }
            line.push_str(&format!(
                " {:>9} {:>9} {:>7}\n",
                seconds(row.recovery_p50_s),
                if row.not_recovered > 0 {
                    format!("{} never", row.not_recovered)
                } else {
                    seconds(row.recovery_max_s)
                },
                row.unsold_after_refusals
            ));
            out.push_str(&line);
        }
        let failed: Vec<&RoundResult> = self.rounds.iter().filter(|r| !r.passed()).collect();
        out.push_str(
            "* units left unsold at rest though buyers had been refused (measured, not a violation)\n",
        );
        out.push_str(&format!(
            "\n{} rounds, {} failed, seed {}, {:.0} s; replay with: {}\n",
            self.rounds.len(),
            failed.len(),
            self.seed,
            self.duration_s,
            self.replay
        ));
        for round in failed {
            out.push_str(&round_failure(round));
        }
        out
    }
}

/// A failed round: its seed, its schedule, its violations, its logs.
pub fn round_failure(round: &RoundResult) -> String {
    let mut out = format!(
        "\nround {} FAILED (seed {}, sku {}; alone: add --round {}):\n",
        round.plan.index, round.plan.seed, round.plan.sku, round.plan.index
    );
    for fault in &round.plan.faults {
        out.push_str(&format!("  fault: {}\n", fault.describe()));
    }
    for v in round.violations.iter().take(20) {
        out.push_str(&format!("  {}: {}\n", v.kind.name(), v.text));
    }
    if round.violations.len() > 20 {
        out.push_str(&format!("  ... and {} more\n", round.violations.len() - 20));
    }
    if let Some(logs) = &round.logs {
        out.push_str(&format!("  logs of every service: {}\n", logs.display()));
    }
    out
}

/// One line per round as it ends, for the progress of a long campaign.
pub fn round_line(round: &RoundResult) -> String {
    let faults: Vec<String> = round.plan.faults.iter().map(|f| f.describe()).collect();
    format!(
        "round {:>3}: {} | {} buyers, {} refused, {} gave up; {} accepted, {} confirmed, {} cancelled, {} rejected | recovered {} | {}",
        round.plan.index,
        faults.join("; "),
        round.buyers,
        round.refused,
        round.gave_up,
        round.accepted,
        round.confirmed,
        round.cancelled,
        round.rejected,
        match &round.not_at_rest {
            Some(why) => format!("never ({why})"),
            None => seconds(round.recovery_s),
        },
        if round.passed() {
            "ok".to_owned()
        } else {
            format!("{} VIOLATIONS", round.violations.len())
        }
    )
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A page of its own, in the surge report's style: the table, a bar of
/// recovery time per kind, and each failed round. No script, no network.
pub fn html(campaign: &Campaign) -> String {
    let longest = campaign
        .summary
        .iter()
        .filter_map(|r| r.recovery_max_s)
        .fold(1.0_f64, f64::max);
    let mut rows = String::new();
    for row in &campaign.summary {
        let mut cells = String::new();
        for column in 0..COLUMNS.len() {
            let n = cell(row, column);
            let class = if n > 0 { " class=\"bad\"" } else { "" };
            cells.push_str(&format!("<td{class}>{n}</td>"));
        }
        let p50 = row.recovery_p50_s.unwrap_or(0.0);
        let max = row.recovery_max_s.unwrap_or(0.0);
        rows.push_str(&format!(
            "<tr><th>{kind}</th><td>{rounds}</td><td>{accepted}</td>{cells}\
             <td class=\"bar\"><svg width=\"240\" height=\"14\" role=\"img\" aria-label=\"recovery\">\
             <rect x=\"0\" y=\"2\" width=\"{wmax:.1}\" height=\"10\" fill=\"#c6dbef\"/>\
             <rect x=\"0\" y=\"2\" width=\"{wp50:.1}\" height=\"10\" fill=\"#3182bd\"/></svg> \
             {p50} / {maxs}{never}</td><td>{unsold}</td></tr>\n",
            kind = row.kind,
            unsold = row.unsold_after_refusals,
            rounds = row.rounds,
            accepted = row.accepted,
            wmax = 240.0 * max / longest,
            wp50 = 240.0 * p50 / longest,
            p50 = seconds(row.recovery_p50_s),
            maxs = seconds(row.recovery_max_s),
            never = if row.not_recovered > 0 {
                format!(", {} never", row.not_recovered)
            } else {
                String::new()
            },
        ));
    }
    let headers: String = COLUMNS
        .iter()
        .map(|(_, name)| format!("<th>{name}</th>"))
        .collect();
    let failures: String = campaign
        .rounds
        .iter()
        .filter(|r| !r.passed())
        .map(|r| format!("<pre>{}</pre>", escape(&round_failure(r))))
        .collect();
    let verdict = if campaign.passed() {
        "<p class=\"ok\">Every round kept every promise.</p>".to_owned()
    } else {
        format!(
            "<p class=\"bad\">{} of {} rounds broke a promise.</p>",
            campaign.rounds.iter().filter(|r| !r.passed()).count(),
            campaign.rounds.len()
        )
    };
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>flashsale chaos campaign, seed {seed}</title>\
         <style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}\
         table{{border-collapse:collapse}}td,th{{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:right}}\
         th:first-child{{text-align:left}}.bad{{color:#b30000;font-weight:bold}}.ok{{color:#1a7f37}}\
         td.bar{{text-align:left;white-space:nowrap}}pre{{background:#f6f8fa;padding:1em;overflow-x:auto}}</style>\
         </head><body>\n<h1>Chaos campaign</h1>\n\
         <p>{n} rounds in {secs:.0} s, seed {seed}. Replay: <code>{replay}</code></p>\n{verdict}\n\
         <table id=\"summary\"><thead><tr><th>fault</th><th>rounds</th><th>accepted</th>{headers}\
         <th>recovery p50 / max</th><th>unsold*</th></tr></thead><tbody>\n{rows}</tbody></table>\n\
         <p>Recovery: from the fault's heal until every accepted purchase is terminal, \
         the consumer groups have no lag and no unit is reserved. \
         Unsold*: units left unsold at rest though buyers had been refused \
         (measured, not a violation).</p>\n{failures}</body></html>\n",
        seed = campaign.seed,
        n = campaign.rounds.len(),
        secs = campaign.duration_s,
        replay = escape(&campaign.replay),
    )
}
