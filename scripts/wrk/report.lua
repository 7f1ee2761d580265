-- Shared by the wrk scripts of scripts/bench-*: a random id per thread (so
-- two threads never send the same key), and at the end one JSON line with
-- what was measured. Loaded with dofile, relative to the repository root
-- (the bench scripts run from there).

function setup(thread)
  thread:set("id", math.random(1, 1000000))
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"seconds":%.3f,"rps":%.1f,"p50_ms":%.3f,"p99_ms":%.3f,"max_ms":%.3f,' ..
    '"non_2xx":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d}\n',
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000,
    e.status, e.connect, e.read, e.write, e.timeout))
end
