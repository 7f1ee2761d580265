//! The W3C `traceparent` a purchase carries from the gateway through every
//! topic, so one trace follows it end to end; a caller's own trace is
//! continued, garbage ignored.

use super::*;

pub const TRACEPARENT: &str = "traceparent";

/// A W3C `traceparent` whose trace id is the request id, so every log line
/// of one purchase, in every service, can be found from the id the buyer got.
pub fn traceparent(request_id: RequestId) -> String {
    let trace = request_id.to_string().replace('-', "");
    format!("00-{trace}-{:016x}-01", new_span_id())
}

fn new_span_id() -> u64 {
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(1) as u64)
        | 1
}

/// The trace a purchase's records carry: the caller's, when its HTTP
/// request came with a valid `traceparent` (continued with a span of our
/// own), else one named by the request id.
pub fn continue_trace(incoming: Option<&str>, request_id: RequestId) -> String {
    let valid = |part: &str, len: usize| {
        part.len() == len
            && part.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            && part.bytes().any(|b| b != b'0')
    };
    match incoming.map(|raw| raw.trim().split('-').collect::<Vec<_>>()) {
        Some(parts)
            if parts.len() == 4
                && parts[0] == "00"
                && valid(parts[1], 32)
                && valid(parts[2], 16)
                && parts[3].len() == 2
                && parts[3].bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            format!("00-{}-{:016x}-{}", parts[1], new_span_id(), parts[3])
        }
        _ => traceparent(request_id),
    }
}

pub fn trace_headers(request_id: RequestId) -> OwnedHeaders {
    headers_with_trace(&traceparent(request_id))
}

pub fn headers_with_trace(traceparent: &str) -> OwnedHeaders {
    OwnedHeaders::new().insert(Header {
        key: TRACEPARENT,
        value: Some(traceparent),
    })
}

/// The value of one header of a message, as text.
pub fn header(message: &impl Message, key: &str) -> Option<String> {
    message.headers().and_then(|headers| {
        headers
            .iter()
            .find(|h| h.key == key)
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_w3c_shaped_and_carries_the_request_id() {
        let id = RequestId::fresh();
        let tp = traceparent(id);
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(parts[0], "00");
        assert_eq!(parts[1], id.to_string().replace('-', ""));
        assert_eq!(parts[2].len(), 16);
        assert_eq!(parts[3], "01");
    }

    #[test]
    fn a_callers_trace_is_continued_and_garbage_ignored() {
        let id = RequestId::fresh();
        let theirs = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ours = continue_trace(Some(theirs), id);
        assert!(ours.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(ours.ends_with("-01"));
        assert_ne!(ours, theirs, "a span of our own");
        let own_trace = id.to_string().replace('-', "");
        for garbage in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf9-00f067aa0ba902b7-01",
            "ünïcödé",
        ] {
            let got = continue_trace(Some(garbage), id);
            assert_eq!(
                got.split('-').nth(1),
                Some(own_trace.as_str()),
                "{garbage:?}"
            );
        }
    }
}
