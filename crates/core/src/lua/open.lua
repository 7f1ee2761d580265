-- Opens a sale: writes its rules and a full stock, forgetting the per-user
-- counts and deadlines of any earlier sale of the sku.
--
-- KEYS[1] stock hash   KEYS[2] units held per user   KEYS[3] reservation deadlines
-- ARGV[1] sale id   ARGV[2] total   ARGV[3] per-user limit   ARGV[4] price (cents)
-- ARGV[5] reservation TTL (ms)   ARGV[6] starts at (ms)   ARGV[7] ends at (ms)
-- ARGV[8] overbook: how many purchases per available unit the gateways
--         let into the queue (admit.lua)
--
-- Returns {"opened", sale_id}, or {"unchanged", sale_id} when this sale is
-- already open (a replayed create). Reservation records and processed
-- markers of an earlier sale stay until their retention ends: they carry
-- its sale id, and every script ignores a record of another sale.

if redis.call('HGET', KEYS[1], 'sale_id') == ARGV[1] then
  return {'unchanged', ARGV[1]}
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
local total = ARGV[2]
redis.call('HSET', KEYS[1], 'sale_id', ARGV[1], 'total', total, 'available', total,
  'reserved', 0, 'sold', 0, 'per_user_limit', ARGV[3], 'price_cents', ARGV[4],
  'ttl_ms', ARGV[5], 'starts_at_ms', ARGV[6], 'ends_at_ms', ARGV[7],
  'overbook', ARGV[8], 'sold_out', (tonumber(total) == 0) and '1' or '0', 'closed', '0')
-- Gateways learn the new sale's flags now, not at their next refresh.
publish_flags(KEYS[1])
return {'opened', ARGV[1]}
