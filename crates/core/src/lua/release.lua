-- Gives the units of a failed purchase back: reserved -> available, once.
--
-- KEYS[1] stock hash   KEYS[2] units held per user   KEYS[3] reservation deadlines
-- KEYS[4] reservation record
-- ARGV[1] request id   ARGV[2] reason
--
-- Returns {"released", reason}: the reason of whichever release happened
-- first (this one, an earlier delivery, or the expiry sweep), so a replay
-- answers the same. Or {"committed"} (a sold unit is never given back),
-- {"missing"} or {"unloaded"}.

local sale_id = redis.call('HGET', KEYS[1], 'sale_id')
if not sale_id then
  return {'unloaded'}
end
local r = redis.call('HMGET', KEYS[4], 'state', 'quantity', 'user', 'sale_id', 'reason')
if not r[1] or r[4] ~= sale_id then
  return {'missing'}
end
if r[1] == 'released' then
  return {'released', r[5]}
end
if r[1] == 'committed' then
  return {'committed'}
end
local qty = tonumber(r[2])
redis.call('HINCRBY', KEYS[1], 'reserved', -qty)
redis.call('HINCRBY', KEYS[1], 'available', qty)
set_flag(KEYS[1], 'sold_out', '0')
redis.call('HINCRBY', KEYS[2], r[3], -qty)
redis.call('HSET', KEYS[4], 'state', 'released', 'reason', ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[1])
return {'released', ARGV[2]}
