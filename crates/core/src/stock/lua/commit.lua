-- Turns a reservation into a sale: reserved -> sold, once. With one unit
-- fewer that could come back, the line may now be longer than its bound:
-- its tail is turned away (line.lua) and announced by the caller.
--
-- KEYS[1] stock hash   KEYS[2] reservation deadlines   KEYS[3] reservation record
-- ARGV[1] request id   ARGV[2] now (ms)
--
-- Returns {answer, announcements}: answer is {"committed"} (now or
-- before), {"expired"} (the deadline passed: the units stay reserved until
-- the sweep or a release gives them back), {"released", reason} (given
-- back, or withdrawn to be: never sold now),
-- {"missing"} (no record of this sale: retention ended, or the sale was
-- replaced) or {"unloaded"} (Redis lost the sku). Announcements as in
-- reserve.lua.

local k = line_keys(KEYS[1])
local sale = sale_of(k)
if not sale then
  return {{'unloaded'}, {}}
end
local r = redis.call('HMGET', KEYS[3], 'state', 'quantity', 'expires_at_ms', 'sale_id', 'reason')
if not r[1] or r[4] ~= sale.sale_id then
  return {{'missing'}, {}}
end
-- Withdrawn by a saga that cancels the order (withdraw.lua): not for sale.
if r[1] == 'released' or r[1] == 'withdrawn' then
  return {{'released', r[5]}, {}}
end
if r[1] == 'committed' then
  return {{'committed'}, {}}
end
local now = tonumber(ARGV[2])
if now > tonumber(r[3]) then
  return {{'expired'}, {}}
end
local qty = tonumber(r[2])
redis.call('HINCRBY', KEYS[1], 'reserved', -qty)
redis.call('HINCRBY', KEYS[1], 'sold', qty)
sale.reserved = sale.reserved - qty
redis.call('HSET', KEYS[3], 'state', 'committed')
redis.call('ZREM', KEYS[2], ARGV[1])
local out = {}
-- Nothing was freed, so nobody is served: only the tail is trimmed.
serve_line(k, sale, now, 0, now + ANNOUNCE_GRACE_MS, out)
settle_flags(k)
return {{'committed'}, out}
