-- Reserves units for one purchase request, at most once per request id.
--
-- KEYS[1] stock hash of the sku     KEYS[2] units held per user
-- KEYS[3] processed-request marker  KEYS[4] reservation record
-- ARGV[1] user id   ARGV[2] quantity   ARGV[3] now (ms)
-- ARGV[4] accepted at (ms)   ARGV[5] max queue age (ms)   ARGV[6] retention (ms)
--
-- Returns {"reserved", expires_at_ms, amount_cents, sale_id}
--      or {"rejected", reason}
-- A replay returns the first answer unchanged: the marker holds it.

local prior = redis.call('GET', KEYS[3])
if prior then
  return cjson.decode(prior)
end

local function answer(result)
  redis.call('SET', KEYS[3], cjson.encode(result), 'PX', ARGV[6])
  return result
end

local user, qty = ARGV[1], tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local sale = redis.call('HMGET', KEYS[1], 'available', 'per_user_limit', 'price_cents',
  'ttl_ms', 'starts_at_ms', 'ends_at_ms', 'sale_id', 'closed')
if not sale[1] then
  return answer({'rejected', 'sale_not_active'})
end
if sale[8] == '1' or now < tonumber(sale[5]) or now >= tonumber(sale[6]) then
  return answer({'rejected', 'sale_not_active'})
end
if now - tonumber(ARGV[4]) > tonumber(ARGV[5]) then
  return answer({'rejected', 'stale'})
end
local held = tonumber(redis.call('HGET', KEYS[2], user) or '0')
if held + qty > tonumber(sale[2]) then
  return answer({'rejected', 'user_limit'})
end
local available = tonumber(sale[1])
if available < qty then
  if available == 0 then
    redis.call('HSET', KEYS[1], 'sold_out', '1')
  end
  return answer({'rejected', 'sold_out'})
end

redis.call('HINCRBY', KEYS[1], 'available', -qty)
redis.call('HINCRBY', KEYS[1], 'reserved', qty)
redis.call('HINCRBY', KEYS[2], user, qty)
if available == qty then
  redis.call('HSET', KEYS[1], 'sold_out', '1')
end
local expires = tostring(now + tonumber(sale[4]))
redis.call('HSET', KEYS[4], 'user', user, 'quantity', qty, 'expires_at_ms', expires,
  'state', 'reserved', 'sale_id', sale[7])
redis.call('PEXPIRE', KEYS[4], ARGV[6])
return answer({'reserved', expires, tostring(qty * tonumber(sale[3])), sale[7]})
