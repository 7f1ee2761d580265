//! Pass/fail criteria on a surge's figures, as k6 has them:
//! `--threshold 'accept_p99_ms<500' --threshold 'oversold==0'`. A surge
//! whose thresholds do not all hold fails with its own exit code, and its
//! report says which did not and by how much.
//!
//! A threshold names any number in the JSON report by its dotted path
//! (`accept_latency_ms.p99`, `fairness.inversions`), or a latency
//! percentile by the short name `<what>_<p50|p99|max>_ms` (`accept_p99_ms`
//! for `accept_latency_ms.p99`, `first_answer_p99_ms` for
//! `first_answer_ms.p99`).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Comparison {
    #[serde(rename = "<")]
    Below,
    #[serde(rename = "<=")]
    AtMost,
    #[serde(rename = ">")]
    Above,
    #[serde(rename = ">=")]
    AtLeast,
    #[serde(rename = "==")]
    Equal,
    #[serde(rename = "!=")]
    NotEqual,
}

impl Comparison {
    /// Longest first, so that `<=` is not read as `<`.
    const ALL: [(&'static str, Comparison); 6] = [
        ("<=", Comparison::AtMost),
        (">=", Comparison::AtLeast),
        ("==", Comparison::Equal),
        ("!=", Comparison::NotEqual),
        ("<", Comparison::Below),
        (">", Comparison::Above),
    ];

    fn holds(self, actual: f64, limit: f64) -> bool {
        match self {
            Self::Below => actual < limit,
            Self::AtMost => actual <= limit,
            Self::Above => actual > limit,
            Self::AtLeast => actual >= limit,
            Self::Equal => actual == limit,
            Self::NotEqual => actual != limit,
        }
    }

    fn symbol(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, c)| *c == self)
            .map_or("?", |(s, _)| s)
    }
}

/// One criterion: `metric comparison value`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Threshold {
    pub metric: String,
    pub comparison: Comparison,
    pub value: f64,
}

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{}{}",
            self.metric,
            self.comparison.symbol(),
            self.value
        )
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ThresholdError {
    #[error("threshold {0:?} is not `metric<value` (or <=, >, >=, ==, !=)")]
    Shape(String),
    #[error("threshold {given:?}: {value:?} is not a number")]
    Value { given: String, value: String },
    #[error("threshold {given:?}: the report has no figure {metric:?}; some it has: {known}")]
    Metric {
        given: String,
        metric: String,
        known: String,
    },
}

impl Threshold {
    /// Parses `metric<value`, checking the metric against the figures a
    /// report has (`figures(&report)` of any report), so that a typo fails
    /// before the surge, not after it.
    pub fn parse(raw: &str, known: &BTreeMap<String, f64>) -> Result<Self, ThresholdError> {
        let compact: String = raw.chars().filter(|c| !c.is_whitespace()).collect();
        let (at, symbol, comparison) = Comparison::ALL
            .iter()
            .filter_map(|(symbol, comparison)| {
                compact.find(symbol).map(|at| (at, *symbol, *comparison))
            })
            .min_by_key(|(at, symbol, _)| (*at, usize::MAX - symbol.len()))
            .ok_or_else(|| ThresholdError::Shape(raw.to_owned()))?;
        let metric = &compact[..at];
        let value = &compact[at + symbol.len()..];
        if metric.is_empty() || value.is_empty() {
            return Err(ThresholdError::Shape(raw.to_owned()));
        }
        let value = value
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| ThresholdError::Value {
                given: raw.to_owned(),
                value: value.to_owned(),
            })?;
        if !known.contains_key(metric) {
            let near: Vec<&str> = known
                .keys()
                .filter(|k| !k.contains('.'))
                .map(String::as_str)
                .take(12)
                .collect();
            return Err(ThresholdError::Metric {
                given: raw.to_owned(),
                metric: metric.to_owned(),
                known: near.join(", "),
            });
        }
        Ok(Self {
            metric: metric.to_owned(),
            comparison,
            value,
        })
    }
}

/// How a threshold fared in one report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checked {
    pub threshold: String,
    /// The report's figure; `null` when it had none (a latency of a
    /// surge that accepted nobody is 0, not missing).
    pub actual: Option<f64>,
    pub held: bool,
}

/// Every number in a report, by dotted path and by short name.
pub fn figures(report: &impl Serialize) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    if let Ok(value) = serde_json::to_value(report) {
        flatten("", &value, &mut out);
    }
    let aliases: Vec<(String, f64)> = out
        .iter()
        .filter_map(|(path, value)| alias(path).map(|short| (short, *value)))
        .collect();
    out.extend(aliases);
    out
}

fn flatten(prefix: &str, value: &serde_json::Value, out: &mut BTreeMap<String, f64>) {
    match value {
        serde_json::Value::Number(n) => {
            if let Some(n) = n.as_f64() {
                out.insert(prefix.to_owned(), n);
            }
        }
        serde_json::Value::Bool(b) => {
            out.insert(prefix.to_owned(), f64::from(u8::from(*b)));
        }
        serde_json::Value::Object(fields) => {
            for (name, value) in fields {
                let path = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}.{name}")
                };
                flatten(&path, value, out);
            }
        }
        // Arrays (the timeline, the per-sku rows) are not figures.
        _ => {}
    }
}

/// `accept_latency_ms.p99` -> `accept_p99_ms`; `first_answer_ms.max` ->
/// `first_answer_max_ms`.
fn alias(path: &str) -> Option<String> {
    let (parent, quantile) = path.rsplit_once('.')?;
    if !matches!(quantile, "p50" | "p99" | "max") || parent.contains('.') {
        return None;
    }
    let what = parent
        .strip_suffix("_latency_ms")
        .or_else(|| parent.strip_suffix("_ms"))?;
    Some(format!("{what}_{quantile}_ms"))
}

/// Checks each threshold against a report's figures.
pub fn check(thresholds: &[Threshold], figures: &BTreeMap<String, f64>) -> Vec<Checked> {
    thresholds
        .iter()
        .map(|t| {
            let actual = figures.get(&t.metric).copied();
            Checked {
                threshold: t.to_string(),
                actual,
                held: actual.is_some_and(|a| t.comparison.holds(a, t.value)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> serde_json::Value {
        serde_json::json!({
            "oversold": 0,
            "errors": 2,
            "audit_ok": true,
            "accept_latency_ms": {"p50": 1.5, "p99": 420.0, "max": 900.0},
            "first_answer_ms": {"p50": 1.0, "p99": 12.0, "max": 30.0},
            "fairness": {"inversions": 3},
            "timeline": [{"t": 0, "sent": 10}],
        })
    }

    #[test]
    fn figures_have_paths_and_short_names() {
        let figures = figures(&report());
        assert_eq!(figures.get("accept_latency_ms.p99"), Some(&420.0));
        assert_eq!(figures.get("accept_p99_ms"), Some(&420.0));
        assert_eq!(figures.get("first_answer_max_ms"), Some(&30.0));
        assert_eq!(figures.get("fairness.inversions"), Some(&3.0));
        assert_eq!(figures.get("audit_ok"), Some(&1.0));
        assert!(!figures.keys().any(|k| k.starts_with("timeline")));
    }

    #[test]
    fn thresholds_parse_check_and_name_what_failed() {
        let figures = figures(&report());
        let parse = |raw: &str| Threshold::parse(raw, &figures);
        let thresholds = vec![
            parse("accept_p99_ms<500").expect("valid"),
            parse(" oversold == 0 ").expect("valid"),
            parse("errors<=1").expect("valid"),
            parse("fairness.inversions>=3").expect("valid"),
            parse("first_answer_p50_ms!=1").expect("valid"),
        ];
        assert_eq!(thresholds[2].comparison, Comparison::AtMost);
        let held: Vec<bool> = check(&thresholds, &figures)
            .iter()
            .map(|c| c.held)
            .collect();
        assert_eq!(held, [true, true, false, true, false]);
        let failed = &check(&thresholds, &figures)[2];
        assert_eq!(
            (failed.threshold.as_str(), failed.actual),
            ("errors<=1", Some(2.0))
        );
    }

    #[test]
    fn a_malformed_threshold_or_an_unknown_figure_is_refused_before_the_surge() {
        let figures = figures(&report());
        assert!(matches!(
            Threshold::parse("accept_p99_ms", &figures),
            Err(ThresholdError::Shape(_))
        ));
        assert!(matches!(
            Threshold::parse("<5", &figures),
            Err(ThresholdError::Shape(_))
        ));
        assert!(matches!(
            Threshold::parse("oversold<=lots", &figures),
            Err(ThresholdError::Value { .. })
        ));
        let unknown = Threshold::parse("acept_p99_ms<5", &figures).expect_err("a typo");
        assert!(unknown.to_string().contains("oversold"), "{unknown}");
    }
}
