-- The expiry sweep: releases up to a limit of reservations whose deadline
-- passed, earliest deadline first, and gives their units to the head of
-- the sku's line (line.lua).
--
-- KEYS[1] stock hash   KEYS[2] units held per user   KEYS[3] reservation deadlines
-- KEYS[4] this sweep's marker
-- ARGV[1] now (ms)   ARGV[2] limit   ARGV[3] prefix of reservation records
-- ("fs:{sku}:res:", same hash tag)   ARGV[4] marker retention (ms)
--
-- Returns {released, announcements}: released is {id1, user1, quantity1,
-- id2, ...}, the reservations this sweep released. A replay with the same
-- sweep id (after a lost reply) answers the same list, so the caller can
-- still tell their buyers; a reservation committed or released meanwhile
-- is only dropped from the deadlines. Announcements as in reserve.lua (a
-- replay has none: the sweep announces what is left in line:out).

local prior = redis.call('GET', KEYS[4])
if prior then
  return {cjson.decode(prior), {}}
end
local k = line_keys(KEYS[1])
local sale = sale_of(k)
if not sale then
  return {{}, {}}
end
local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local released = {}
local units = 0
for _, id in ipairs(due) do
  local record = ARGV[3] .. id
  local r = redis.call('HMGET', record, 'state', 'quantity', 'user', 'sale_id')
  -- Withdrawn (withdraw.lua) is still held: its release may not come.
  if (r[1] == 'reserved' or r[1] == 'withdrawn') and r[4] == sale.sale_id then
    local qty = tonumber(r[2])
    units = units + qty
    redis.call('HINCRBY', KEYS[2], r[3], -qty)
    redis.call('HSET', record, 'state', 'released', 'reason', 'reservation_expired')
    table.insert(released, id)
    table.insert(released, r[3])
    table.insert(released, tostring(qty))
  end
  redis.call('ZREM', KEYS[3], id)
end
local out = {}
if units > 0 then
  redis.call('HINCRBY', KEYS[1], 'reserved', -units)
  redis.call('HINCRBY', KEYS[1], 'available', units)
  sale.reserved = sale.reserved - units
  sale.available = sale.available + units
  local now = tonumber(ARGV[1])
  serve_line(k, sale, now, tonumber(ARGV[2]), now + ANNOUNCE_GRACE_MS, out)
end
settle_flags(k)
redis.call('SET', KEYS[4], cjson.encode(released), 'PX', ARGV[4])
return {released, out}
