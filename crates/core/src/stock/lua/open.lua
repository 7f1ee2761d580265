-- Opens a sale: writes its rules and a full stock, forgetting the per-user
-- counts, deadlines and line of any earlier sale of the sku.
--
-- KEYS[1] stock hash   KEYS[2] units held per user   KEYS[3] reservation deadlines
-- ARGV[1] sale id   ARGV[2] total   ARGV[3] per-user limit   ARGV[4] price (cents)
-- ARGV[5] reservation TTL (ms)   ARGV[6] starts at (ms)   ARGV[7] ends at (ms)
-- ARGV[8] overbook: how many buyers per unit not yet sold may hold or wait
--         for one (line.lua)
-- ARGV[9] the salt of the draw among early buyers (secret, random)
-- ARGV[10] how long answers and records are kept (ms)
--
-- Returns {"opened", sale_id}, or {"unchanged", sale_id} when this sale is
-- already open (a replayed create). Reservation records and processed
-- markers of an earlier sale stay until their retention ends: they carry
-- its sale id, and every script ignores a record of another sale.

if redis.call('HGET', KEYS[1], 'sale_id') == ARGV[1] then
  return {'unchanged', ARGV[1]}
end
local k = line_keys(KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], k.admitted, k.ever, k.line, k.who, k.seen, k.out)
local total = ARGV[2]
redis.call('HSET', KEYS[1], 'sale_id', ARGV[1], 'total', total, 'available', total,
  'reserved', 0, 'sold', 0, 'per_user_limit', ARGV[3], 'price_cents', ARGV[4],
  'ttl_ms', ARGV[5], 'starts_at_ms', ARGV[6], 'ends_at_ms', ARGV[7],
  'overbook', ARGV[8], 'line_salt', ARGV[9], 'retention_ms', ARGV[10],
  'sold_out', '', 'closed', '0', 'line_full', '', 'line_seq', 0)
-- Gateways forget the admissions of the earlier sale, and learn the new
-- sale's flags now, not at their next refresh.
local sku = string.match(KEYS[1], '^fs:{(.+)}:stock$') or KEYS[1]
redis.call('PUBLISH', 'fs:admitted', sku .. ' *')
settle_flags(k)
return {'opened', ARGV[1]}
