//! `flashsale report merge`: the reports of generators that sent one crowd
//! between them (`surge --shard i/n`) as one report. Counts add up;
//! latencies come from the merged histograms each report carries, never
//! from averaged percentiles; the timeline adds up second by second (the
//! shards share their start); what every shard saw alike (the audit of
//! the same skus) is taken once, the worst of them.
//!
//! Fairness adds up each shard's own count: an inversion between two
//! buyers of different shards cannot be seen from the reports.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;

use crate::histogram::{self, DecodeError, encode, latency};
use crate::surge::{Fairness, Histograms, LineReport, Second, Shed, SkuReport, SurgeReport};

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("no report to merge")]
    Nothing,
    #[error(transparent)]
    Histogram(#[from] DecodeError),
}

/// Merges `reports` into the report of the whole crowd.
pub fn merge(reports: &[SurgeReport]) -> Result<SurgeReport, MergeError> {
    let first = reports.first().ok_or(MergeError::Nothing)?;
    let sum = |f: fn(&SurgeReport) -> u64| reports.iter().map(f).sum::<u64>();
    let hists = Merged::of(reports.iter().map(|r| &r.histograms))?;
    let mut violations: Vec<String> = reports.iter().flat_map(|r| r.violations.clone()).collect();
    violations.sort();
    violations.dedup();
    let mut skus: BTreeMap<String, Vec<&SkuReport>> = BTreeMap::new();
    for report in reports {
        for sku in &report.skus {
            skus.entry(sku.sku.clone()).or_default().push(sku);
        }
    }
    // In the order the first report lists them.
    let mut order: Vec<String> = first.skus.iter().map(|s| s.sku.clone()).collect();
    order.extend(
        skus.keys()
            .filter(|k| !order.contains(k))
            .cloned()
            .collect::<Vec<_>>(),
    );
    let skus = order
        .iter()
        .filter_map(|name| skus.get(name))
        .map(|rows| merge_sku(rows))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(SurgeReport {
        buyers: sum(|r| r.buyers),
        accepted: sum(|r| r.accepted),
        retries: sum(|r| r.retries),
        shed: add_shed(reports.iter().map(|r| &r.shed)),
        errors: sum(|r| r.errors),
        confirmed: sum(|r| r.confirmed),
        cancelled: sum(|r| r.cancelled),
        rejected: sum(|r| r.rejected),
        unsettled: sum(|r| r.unsettled),
        // Every shard audited the same skus: the last to finish saw most.
        units_sold: reports
            .iter()
            .map(|r| r.units_sold)
            .max()
            .unwrap_or_default(),
        stock: first.stock,
        oversold: reports.iter().map(|r| r.oversold).max().unwrap_or_default(),
        audit_ok: reports.iter().all(|r| r.audit_ok),
        violations,
        accept_latency_ms: latency(&hists.accept),
        decision_latency_ms: latency(&hists.decision),
        first_answer_ms: latency(&hists.first_answer),
        final_answer_ms: latency(&hists.final_answer),
        sold_out_after_s: latest(reports.iter().map(|r| r.sold_out_after_s)),
        all_decided_after_s: latest(reports.iter().map(|r| r.all_decided_after_s)),
        line: LineReport {
            waited: sum(|r| r.line.waited),
            served: sum(|r| r.line.served),
            wait_ms: latency(&hists.line_wait),
        },
        fairness: add_fairness(reports.iter().map(|r| &r.fairness)),
        accept_rps: reports.iter().map(|r| r.accept_rps).sum(),
        answered_rps: reports.iter().map(|r| r.answered_rps).sum(),
        duration_s: reports.iter().map(|r| r.duration_s).fold(0.0, f64::max),
        timeline: merge_timeline(reports)?,
        skus,
        histograms: hists.encoded(),
        behaviour: add_behaviour(reports)?,
        // Every shard watched the same stock and groups: the first's view.
        samples: first.samples.clone(),
        thresholds: Vec::new(),
    })
}

fn merge_sku(rows: &[&SkuReport]) -> Result<SkuReport, MergeError> {
    let sum = |f: fn(&SkuReport) -> u64| rows.iter().map(|r| f(r)).sum::<u64>();
    let hists = Merged::of(rows.iter().map(|r| &r.histograms))?;
    let first = rows.first().ok_or(MergeError::Nothing)?;
    Ok(SkuReport {
        sku: first.sku.clone(),
        stock: first.stock,
        buyers: sum(|r| r.buyers),
        accepted: sum(|r| r.accepted),
        shed: add_shed(rows.iter().map(|r| &r.shed)),
        errors: sum(|r| r.errors),
        confirmed: sum(|r| r.confirmed),
        cancelled: sum(|r| r.cancelled),
        rejected: sum(|r| r.rejected),
        unsettled: sum(|r| r.unsettled),
        units_sold: rows.iter().map(|r| r.units_sold).max().unwrap_or_default(),
        oversold: rows.iter().map(|r| r.oversold).max().unwrap_or_default(),
        audit_ok: rows.iter().all(|r| r.audit_ok),
        accept_latency_ms: latency(&hists.accept),
        decision_latency_ms: latency(&hists.decision),
        final_answer_ms: latency(&hists.final_answer),
        sold_out_after_s: latest(rows.iter().map(|r| r.sold_out_after_s)),
        all_decided_after_s: latest(rows.iter().map(|r| r.all_decided_after_s)),
        line: LineReport {
            waited: sum(|r| r.line.waited),
            served: sum(|r| r.line.served),
            wait_ms: latency(&hists.line_wait),
        },
        fairness: add_fairness(rows.iter().map(|r| &r.fairness)),
        histograms: hists.encoded(),
    })
}

fn merge_timeline(reports: &[SurgeReport]) -> Result<Vec<Second>, MergeError> {
    let len = reports.iter().map(|r| r.timeline.len()).max().unwrap_or(0);
    (0..len)
        .map(|t| {
            let seconds: Vec<&Second> = reports.iter().filter_map(|r| r.timeline.get(t)).collect();
            let sum = |f: fn(&Second) -> u64| seconds.iter().map(|s| f(s)).sum::<u64>();
            let mut accept = histogram::new();
            for second in &seconds {
                add(&mut accept, &second.accept_histogram)?;
            }
            Ok(Second {
                t: t as u64,
                due: sum(|s| s.due),
                answered: sum(|s| s.answered),
                accepted: sum(|s| s.accepted),
                shed: sum(|s| s.shed),
                errors: sum(|s| s.errors),
                decided: sum(|s| s.decided),
                confirmed: sum(|s| s.confirmed),
                accept_ms: latency(&accept),
                accept_histogram: encode(&accept),
            })
        })
        .collect()
}

/// The latest of the shards' times, or `None` if any has none (something
/// stayed unsold or undecided).
fn latest(mut times: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    times.try_fold(0.0, |acc: f64, t| Some(acc.max(t?)))
}

/// Counts added; the poll latency from the merged histograms.
fn add_behaviour(reports: &[SurgeReport]) -> Result<crate::surge::BehaviourReport, MergeError> {
    let sum = |f: fn(&crate::surge::BehaviourReport) -> u64| {
        reports.iter().map(|r| f(&r.behaviour)).sum::<u64>()
    };
    let mut seen = histogram::new();
    for report in reports {
        add(&mut seen, &report.behaviour.poll_terminal_histogram)?;
    }
    Ok(crate::surge::BehaviourReport {
        gave_up: sum(|b| b.gave_up),
        pollers: sum(|b| b.pollers),
        polls: sum(|b| b.polls),
        polls_saw_terminal: sum(|b| b.polls_saw_terminal),
        poll_terminal_ms: latency(&seen),
        poll_terminal_histogram: encode(&seen),
        second_tries: sum(|b| b.second_tries),
        second_accepted: sum(|b| b.second_accepted),
        second_got_a_unit: sum(|b| b.second_got_a_unit),
        over_limit: sum(|b| b.over_limit),
    })
}

fn add_shed<'a>(sheds: impl Iterator<Item = &'a Shed>) -> Shed {
    sheds.fold(Shed::default(), |acc, s| Shed {
        sold_out: acc.sold_out + s.sold_out,
        rate_limited: acc.rate_limited + s.rate_limited,
        overloaded: acc.overloaded + s.overloaded,
        invalid: acc.invalid + s.invalid,
    })
}

fn add_fairness<'a>(all: impl Iterator<Item = &'a Fairness>) -> Fairness {
    all.fold(Fairness::default(), |acc, f| Fairness {
        winners: acc.winners + f.winners,
        winners_among_first: acc.winners_among_first + f.winners_among_first,
        inversions: acc.inversions + f.inversions,
        passed_over: acc.passed_over + f.passed_over,
    })
}

fn add(into: &mut Histogram<u64>, encoded: &str) -> Result<(), MergeError> {
    let h = histogram::decode(encoded)?;
    into.add(&h)
        .map_err(|e| DecodeError::from(format!("{e:?}")))?;
    Ok(())
}

/// The histograms of several reports, added up.
struct Merged {
    accept: Histogram<u64>,
    first_answer: Histogram<u64>,
    final_answer: Histogram<u64>,
    decision: Histogram<u64>,
    line_wait: Histogram<u64>,
}

impl Merged {
    fn of<'a>(all: impl Iterator<Item = &'a Histograms>) -> Result<Self, MergeError> {
        let mut out = Self {
            accept: histogram::new(),
            first_answer: histogram::new(),
            final_answer: histogram::new(),
            decision: histogram::new(),
            line_wait: histogram::new(),
        };
        for h in all {
            add(&mut out.accept, &h.accept)?;
            add(&mut out.first_answer, &h.first_answer)?;
            add(&mut out.final_answer, &h.final_answer)?;
            add(&mut out.decision, &h.decision)?;
            add(&mut out.line_wait, &h.line_wait)?;
        }
        Ok(out)
    }

    fn encoded(&self) -> Histograms {
        Histograms {
            accept: encode(&self.accept),
            first_answer: encode(&self.first_answer),
            final_answer: encode(&self.final_answer),
            decision: encode(&self.decision),
            line_wait: encode(&self.line_wait),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shard's report with these accept latencies (µs), one per buyer,
    /// all in second 0.
    fn shard(accept_us: &[u64], sku: &str) -> SurgeReport {
        let mut h = histogram::new();
        for us in accept_us {
            h.record(*us).expect("in range");
        }
        let histograms = Histograms {
            accept: encode(&h),
            ..Histograms::default()
        };
        SurgeReport {
            buyers: accept_us.len() as u64,
            accepted: 1,
            stock: 10,
            units_sold: 10,
            audit_ok: true,
            accept_latency_ms: latency(&h),
            sold_out_after_s: Some(accept_us.len() as f64),
            timeline: vec![Second {
                due: accept_us.len() as u64,
                accept_histogram: encode(&h),
                ..Second::default()
            }],
            skus: vec![SkuReport {
                sku: sku.into(),
                stock: 10,
                buyers: accept_us.len() as u64,
                histograms: histograms.clone(),
                ..SkuReport::default()
            }],
            histograms,
            ..SurgeReport::default()
        }
    }

    #[test]
    fn shards_merge_into_the_histogram_of_the_whole_crowd() {
        // One fast shard, one slow: averaged p99s would say 50 ms.
        let fast: Vec<u64> = (1..=990).map(|i| i * 10).collect();
        let slow: Vec<u64> = (1..=10).map(|i| 100_000 + i).collect();
        let merged = merge(&[shard(&fast, "tv"), shard(&slow, "tv")]).expect("merges");
        let mut whole = histogram::new();
        for us in fast.iter().chain(&slow) {
            whole.record(*us).expect("in range");
        }
        assert_eq!(merged.buyers, 1_000);
        assert_eq!(merged.accepted, 2);
        assert_eq!(merged.accept_latency_ms, latency(&whole));
        assert_eq!(merged.timeline[0].due, 1_000);
        assert_eq!(merged.timeline[0].accept_ms, latency(&whole));
        assert_eq!(merged.skus.len(), 1);
        assert_eq!(merged.skus[0].buyers, 1_000);
        assert_eq!(merged.skus[0].accept_latency_ms, latency(&whole));
        // Audited alike by both: taken once.
        assert_eq!((merged.units_sold, merged.stock), (10, 10));
        assert_eq!(merged.sold_out_after_s, Some(990.0));
        let mut unsold = shard(&slow, "tv");
        unsold.sold_out_after_s = None;
        let merged = merge(&[shard(&fast, "tv"), unsold]).expect("merges");
        assert_eq!(merged.sold_out_after_s, None);
        assert!(matches!(merge(&[]), Err(MergeError::Nothing)));
    }
}
