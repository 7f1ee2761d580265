//! Wall-clock time in Unix milliseconds: what the scripts receive as `now`
//! and what every record's timestamps are made of.

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
