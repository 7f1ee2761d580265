-- wrk script of scripts/bench-gateway: one purchase of one unit of $SKU per
-- request, each from a different buyer (so no per-buyer limit applies), no
-- Idempotency-Key. The report: report.lua.
local sku = os.getenv("SKU") or "bench-open"
local counter = 0

dofile("scripts/wrk/report.lua")

function request()
  counter = counter + 1
  local body = string.format('{"sku":"%s","user_id":"bench-%d-%d","quantity":1}', sku, id, counter)
  return wrk.format("POST", "/v1/purchases", { ["Content-Type"] = "application/json" }, body)
end
