-- Gives the units of a failed purchase back: reserved -> available, once,
-- and at once to the head of the sku's line if buyers wait (line.lua).
--
-- KEYS[1] stock hash   KEYS[2] units held per user   KEYS[3] reservation deadlines
-- KEYS[4] reservation record
-- ARGV[1] request id   ARGV[2] reason   ARGV[3] now (ms)
-- ARGV[4] how many waiters one call may serve at most
--
-- Returns {answer, announcements}: answer is {"released", reason}, the
-- reason of whichever release happened first (this one, an earlier
-- delivery, or the expiry sweep), so a replay answers the same; or
-- {"committed"} (a sold unit is never given back), {"missing"} or
-- {"unloaded"}. Announcements as in reserve.lua.

local k = line_keys(KEYS[1])
local sale = sale_of(k)
if not sale then
  return {{'unloaded'}, {}}
end
local r = redis.call('HMGET', KEYS[4], 'state', 'quantity', 'user', 'sale_id', 'reason')
if not r[1] or r[4] ~= sale.sale_id then
  return {{'missing'}, {}}
end
if r[1] == 'released' then
  return {{'released', r[5]}, {}}
end
if r[1] == 'committed' then
  return {{'committed'}, {}}
end
local qty = tonumber(r[2])
redis.call('HINCRBY', KEYS[1], 'reserved', -qty)
redis.call('HINCRBY', KEYS[1], 'available', qty)
sale.reserved = sale.reserved - qty
sale.available = sale.available + qty
redis.call('HINCRBY', KEYS[2], r[3], -qty)
redis.call('HSET', KEYS[4], 'state', 'released', 'reason', ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[1])
local now = tonumber(ARGV[3])
local out = {}
serve_line(k, sale, now, tonumber(ARGV[4]), now + ANNOUNCE_GRACE_MS, out)
settle_flags(k)
return {{'released', ARGV[2]}, out}
