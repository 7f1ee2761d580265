//! A surge's latencies: HDR histograms in microseconds, and how a report
//! carries them (base64 of HdrHistogram's compressed V2 encoding, the one
//! its other implementations read), so that the reports of several
//! generators merge into the histogram of the whole crowd, not an average
//! of percentiles.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer};
use serde::{Deserialize, Serialize};

/// p50, p99 and the maximum, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

#[allow(
    clippy::expect_used,
    reason = "constant bounds within hdrhistogram's limits; every surge test builds one"
)]
pub fn new() -> Histogram<u64> {
    // Microseconds, up to an hour, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant bounds are valid")
}

pub fn latency(h: &Histogram<u64>) -> Latency {
    let ms = |us: u64| us as f64 / 1000.0;
    if h.is_empty() {
        return Latency::default();
    }
    Latency {
        p50: ms(h.value_at_quantile(0.50)),
        p99: ms(h.value_at_quantile(0.99)),
        max: ms(h.max()),
    }
}

/// The histogram as report text; empty for an empty histogram.
pub fn encode(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return String::new();
    }
    let mut bytes = Vec::new();
    match V2DeflateSerializer::new().serialize(h, &mut bytes) {
        Ok(_) => STANDARD.encode(bytes),
        Err(error) => {
            tracing::warn!(?error, "a histogram could not be encoded");
            String::new()
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("a report's histogram cannot be read: {0}")]
pub struct DecodeError(String);

impl From<String> for DecodeError {
    fn from(why: String) -> Self {
        Self(why)
    }
}

/// Report text back into a histogram (empty text: an empty histogram).
pub fn decode(text: &str) -> Result<Histogram<u64>, DecodeError> {
    let mut out = new();
    if text.is_empty() {
        return Ok(out);
    }
    let bytes = STANDARD
        .decode(text)
        .map_err(|e| DecodeError(e.to_string()))?;
    let read: Histogram<u64> = Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| DecodeError(format!("{e:?}")))?;
    out.add(&read).map_err(|e| DecodeError(format!("{e:?}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_survives_the_report_and_merges_exactly() {
        let (mut a, mut b, mut both) = (new(), new(), new());
        for us in 1..=1000u64 {
            let target = if us % 3 == 0 { &mut a } else { &mut b };
            target.record(us * 997).expect("in range");
            both.record(us * 997).expect("in range");
        }
        let mut merged = decode(&encode(&a)).expect("decodes");
        merged
            .add(decode(&encode(&b)).expect("decodes"))
            .expect("same bounds");
        assert_eq!(merged.len(), both.len());
        assert_eq!(latency(&merged), latency(&both));
        assert!(decode("").expect("empty").is_empty());
        assert!(decode("not base64!").is_err());
    }
}
