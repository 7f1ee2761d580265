//! The trace file of a surge's arrivals: what the gateway records
//! (`FLASHSALE_GATEWAY_RECORD_FILE`) and `flashsale surge --replay` sends
//! again. JSON lines, one per well-formed purchase that arrived, with only
//! the ids the gateway already has (never a token, never a key).

use serde::{Deserialize, Serialize};

/// One arrival.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceLine {
    /// Milliseconds since the first recorded arrival, to the microsecond.
    pub offset_ms: f64,
    pub sku: String,
    pub user: String,
    pub quantity: u32,
    /// Whether it came with an `Idempotency-Key`.
    pub keyed: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("line {line} of the trace is not an arrival: {problem}")]
pub struct TraceError {
    pub line: usize,
    pub problem: String,
}

/// Reads a trace, its arrivals in the order of their offsets. A last line
/// without its newline that does not parse is one a gateway is still
/// writing, and is left out.
pub fn parse(text: &str) -> Result<Vec<TraceLine>, TraceError> {
    let complete = match text.rsplit_once('\n') {
        Some((done, partial))
            if !partial.trim().is_empty()
                && serde_json::from_str::<TraceLine>(partial).is_err() =>
        {
            done
        }
        _ => text,
    };
    let mut lines = complete
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str::<TraceLine>(l).map_err(|e| TraceError {
                line: i + 1,
                problem: e.to_string(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(bad) = lines
        .iter()
        .position(|l| !(l.offset_ms.is_finite() && l.offset_ms >= 0.0))
    {
        return Err(TraceError {
            line: bad + 1,
            problem: "offset_ms must be a number, 0 or more".into(),
        });
    }
    lines.sort_by(|a, b| a.offset_ms.total_cmp(&b.offset_ms));
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_is_read_in_offset_order_and_garbage_named_by_line() {
        let text = "{\"offset_ms\":5.5,\"sku\":\"tv\",\"user\":\"b\",\"quantity\":1,\"keyed\":true}\n\n\
                    {\"offset_ms\":0,\"sku\":\"tv\",\"user\":\"a\",\"quantity\":2,\"keyed\":false}\n";
        let lines = parse(text).expect("a trace");
        assert_eq!(lines.len(), 2);
        assert_eq!((lines[0].user.as_str(), lines[0].quantity), ("a", 2));
        let error = parse("{\"offset_ms\":1}\n").expect_err("not an arrival");
        assert_eq!(error.line, 1);
        // A line still being written is left out.
        let partial = format!("{text}{{\"offset_ms\":7,\"sku");
        assert_eq!(parse(&partial).expect("a trace").len(), 2);
        let error = parse(&format!(
            "{}\n{{\"offset_ms\":-1,\"sku\":\"tv\",\"user\":\"a\",\"quantity\":1,\"keyed\":true}}",
            text.lines().next().unwrap_or_default()
        ))
        .expect_err("negative");
        assert_eq!(error.line, 2);
    }
}
