-- Gives the units of a failed purchase back: reserved -> available, once.
--
-- KEYS[1] stock hash   KEYS[2] units held per user   KEYS[3] reservation record
--
-- Returns "released" (just now), "already_released", "committed" (a sold
-- unit is never given back) or "missing".

local r = redis.call('HMGET', KEYS[3], 'state', 'quantity', 'user')
if not r[1] then
  return 'missing'
end
if r[1] == 'released' then
  return 'already_released'
end
if r[1] == 'committed' then
  return 'committed'
end
local qty = tonumber(r[2])
redis.call('HINCRBY', KEYS[1], 'reserved', -qty)
redis.call('HINCRBY', KEYS[1], 'available', qty)
redis.call('HINCRBY', KEYS[2], r[3], -qty)
redis.call('HSET', KEYS[3], 'state', 'released')
redis.call('HSET', KEYS[1], 'sold_out', '0')
return 'released'
