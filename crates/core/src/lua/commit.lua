-- Turns a reservation into a sale: reserved -> sold, once.
--
-- KEYS[1] stock hash   KEYS[2] reservation record
-- ARGV[1] now (ms)
--
-- Returns "committed" (now or before), "expired" (deadline passed: the
-- units stay reserved until released), "released" or "missing".

local r = redis.call('HMGET', KEYS[2], 'state', 'quantity', 'expires_at_ms')
if not r[1] then
  return 'missing'
end
if r[1] ~= 'reserved' then
  return r[1]
end
if tonumber(ARGV[1]) > tonumber(r[3]) then
  return 'expired'
end
local qty = tonumber(r[2])
redis.call('HINCRBY', KEYS[1], 'reserved', -qty)
redis.call('HINCRBY', KEYS[1], 'sold', qty)
redis.call('HSET', KEYS[2], 'state', 'committed')
return 'committed'
