-- Reserves units for one purchase request, at most once per request id:
-- available -> reserved, with a deadline.
--
-- KEYS[1] stock hash of the sku     KEYS[2] units held per user
-- KEYS[3] processed-request marker  KEYS[4] reservation record
-- KEYS[5] reservation deadlines (sorted set, score = deadline)
-- KEYS[6] requests the gateways admitted and no shop-worker has reserved
--         or rejected yet (admit.lua)
-- ARGV[1] request id   ARGV[2] user id   ARGV[3] quantity   ARGV[4] now (ms)
-- ARGV[5] accepted at (ms)   ARGV[6] max queue age (ms)   ARGV[7] retention (ms)
--
-- Returns {"reserved", expires_at_ms, amount_cents, sale_id}
--      or {"rejected", reason}
--      or {"unloaded"}: the sku has no stock here (Redis was lost and not
--         yet recovered); nothing is written, the caller waits.
-- A replay returns the first answer unchanged: the marker holds it.

-- Whatever the answer, this request no longer waits in the queue, so its
-- place in the admission window is free.
redis.call('ZREM', KEYS[6], ARGV[1])
local prior = redis.call('GET', KEYS[3])
if prior then
  return cjson.decode(prior)
end

local sale = redis.call('HMGET', KEYS[1], 'available', 'per_user_limit', 'price_cents',
  'ttl_ms', 'starts_at_ms', 'ends_at_ms', 'sale_id', 'closed')
if not sale[1] then
  return {'unloaded'}
end

local function answer(result)
  redis.call('SET', KEYS[3], cjson.encode(result), 'PX', ARGV[7])
  return result
end

local id, user, qty = ARGV[1], ARGV[2], tonumber(ARGV[3])
local now = tonumber(ARGV[4])
if sale[8] == '1' or now < tonumber(sale[5]) or now >= tonumber(sale[6]) then
  return answer({'rejected', 'sale_not_active'})
end
if now - tonumber(ARGV[5]) > tonumber(ARGV[6]) then
  return answer({'rejected', 'stale'})
end
local held = tonumber(redis.call('HGET', KEYS[2], user) or '0')
if held + qty > tonumber(sale[2]) then
  return answer({'rejected', 'user_limit'})
end
local available = tonumber(sale[1])
if available < qty then
  if available == 0 then
    set_flag(KEYS[1], 'sold_out', '1')
  end
  return answer({'rejected', 'sold_out'})
end

redis.call('HINCRBY', KEYS[1], 'available', -qty)
redis.call('HINCRBY', KEYS[1], 'reserved', qty)
redis.call('HINCRBY', KEYS[2], user, qty)
if available == qty then
  set_flag(KEYS[1], 'sold_out', '1')
end
local expires = now + tonumber(sale[4])
redis.call('HSET', KEYS[4], 'user', user, 'quantity', qty, 'expires_at_ms', expires,
  'state', 'reserved', 'sale_id', sale[7])
-- The record outlives its deadline by the retention, so a late commit or
-- release still finds it.
redis.call('PEXPIRE', KEYS[4], tonumber(sale[4]) + tonumber(ARGV[7]))
redis.call('ZADD', KEYS[5], expires, id)
return answer({'reserved', tostring(expires), tostring(qty * tonumber(sale[3])), sale[7]})
