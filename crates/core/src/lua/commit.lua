-- Turns a reservation into a sale: reserved -> sold, once.
--
-- KEYS[1] stock hash   KEYS[2] reservation deadlines   KEYS[3] reservation record
-- ARGV[1] request id   ARGV[2] now (ms)
--
-- Returns {"committed"} (now or before), {"expired"} (the deadline passed:
-- the units stay reserved until the sweep or a release gives them back),
-- {"released", reason}, {"missing"} (no record of this sale: retention
-- ended, or the sale was replaced) or {"unloaded"} (Redis lost the sku).

local sale_id = redis.call('HGET', KEYS[1], 'sale_id')
if not sale_id then
  return {'unloaded'}
end
local r = redis.call('HMGET', KEYS[3], 'state', 'quantity', 'expires_at_ms', 'sale_id', 'reason')
if not r[1] or r[4] ~= sale_id then
  return {'missing'}
end
if r[1] == 'released' then
  return {'released', r[5]}
end
if r[1] == 'committed' then
  return {'committed'}
end
if tonumber(ARGV[2]) > tonumber(r[3]) then
  return {'expired'}
end
local qty = tonumber(r[2])
redis.call('HINCRBY', KEYS[1], 'reserved', -qty)
redis.call('HINCRBY', KEYS[1], 'sold', qty)
redis.call('HSET', KEYS[3], 'state', 'committed')
redis.call('ZREM', KEYS[2], ARGV[1])
return {'committed'}
