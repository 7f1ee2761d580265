-- wrk script of scripts/bench-gateway: one purchase of one unit of $SKU per
-- request, each from a different buyer (so no per-buyer limit applies), no
-- Idempotency-Key. At the end, one JSON line with what was measured.
local sku = os.getenv("SKU") or "bench-open"
local counter = 0

function setup(thread)
  thread:set("id", math.random(1, 1000000))
end

function request()
  counter = counter + 1
  local body = string.format('{"sku":"%s","user_id":"bench-%d-%d","quantity":1}', sku, id, counter)
  return wrk.format("POST", "/v1/purchases", { ["Content-Type"] = "application/json" }, body)
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
