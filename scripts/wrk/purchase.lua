-- wrk script of scripts/bench-gateway: one purchase of one unit of $SKU per
-- request, each from a different buyer (so no per-buyer limit applies),
-- with an Idempotency-Key of its own when KEYED=1, else none. The report:
-- report.lua.
local sku = os.getenv("SKU") or "bench-open"
local keyed = os.getenv("KEYED") == "1"
local counter = 0

dofile("scripts/wrk/report.lua")

function request()
  counter = counter + 1
  local body = string.format('{"sku":"%s","user_id":"bench-%d-%d","quantity":1}', sku, id, counter)
  local headers = { ["Content-Type"] = "application/json" }
  if keyed then
    headers["Idempotency-Key"] = string.format("k-%d-%d", id, counter)
  end
  return wrk.format("POST", "/v1/purchases", headers, body)
end
