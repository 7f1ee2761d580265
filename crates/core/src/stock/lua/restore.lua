-- Writes a sku's stock back after Redis lost it (the recovery, from the
-- orders in DynamoDB), in the layout every other script reads: the one
-- place besides open.lua and take() that writes a reservation's record,
-- marker and deadline, or the stock hash. Called after `unload`, in two
-- steps: the reservations in chunks, then the stock hash, whose existence
-- is what makes the sku usable again, so no script sees half a restore.
--
-- KEYS[1] stock hash
-- ARGV[1] 'reservations':
--   ARGV[2] sale id   ARGV[3] how long answers are kept (ms)
--   ARGV[4] how long a record is kept (its TTL and the retention, ms)
--   then per reservation, 7 values: request id, user, quantity,
--   deadline (ms), state ('reserved', 'committed' or 'released'),
--   release reason ('' unless released), amount (cents)
--   -> {'written', n}
-- ARGV[1] 'stock':
--   ARGV[2] sale id   ARGV[3] total   ARGV[4] per-user limit
--   ARGV[5] price (cents)   ARGV[6] reservation TTL (ms)   ARGV[7] starts at
--   ARGV[8] ends at   ARGV[9] overbook (as open.lua takes them)
--   ARGV[10] reserved   ARGV[11] sold   ARGV[12] retention (ms)
--   ARGV[13] closed ('1' or '0')
--   -> {'restored', available, sold_out, line_full}
-- Either answers {'loaded'} if the stock hash exists: a sku that was not
-- unloaded is never written over.

if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'loaded'}
end
local k = line_keys(KEYS[1])

if ARGV[1] == 'reservations' then
  local sale_id, retention, life = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
  local n = 0
  for i = 5, #ARGV, 7 do
    local id, user, qty, expires = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3]
    local state, reason, amount = ARGV[i + 4], ARGV[i + 5], ARGV[i + 6]
    local record = k.record .. id
    redis.call('HSET', record, 'user', user, 'quantity', qty, 'expires_at_ms', expires,
      'state', state, 'sale_id', sale_id, 'reason', reason)
    redis.call('PEXPIRE', record, life)
    if state == 'reserved' then
      redis.call('ZADD', k.deadlines, expires, id)
    end
    if state ~= 'released' then
      redis.call('HINCRBY', k.users, user, qty)
    end
    -- So that a redelivered purchase is answered, not reserved again.
    redis.call('SET', k.marker .. id, cjson.encode({'reserved', expires, amount, sale_id}),
      'PX', retention)
    n = n + 1
  end
  return {'written', n}
end

local total, reserved, sold = tonumber(ARGV[3]), tonumber(ARGV[10]), tonumber(ARGV[11])
local available = total - reserved - sold
redis.call('HSET', KEYS[1], 'sale_id', ARGV[2], 'total', total, 'available', available,
  'reserved', reserved, 'sold', sold, 'per_user_limit', ARGV[4], 'price_cents', ARGV[5],
  'ttl_ms', ARGV[6], 'starts_at_ms', ARGV[7], 'ends_at_ms', ARGV[8], 'overbook', ARGV[9],
  'retention_ms', ARGV[12], 'closed', ARGV[13])
-- The line is not restored (it lived only in Redis): the holders alone
-- decide whether there is room.
local sold_out = available <= 0 and '1' or '0'
local full = redis.call('ZCARD', k.deadlines) >= line_cap(k) and '1' or '0'
redis.call('HSET', KEYS[1], 'sold_out', sold_out, 'line_full', full)
-- Gateways that still remember the sku learn its flags now.
publish_flags(KEYS[1])
return {'restored', tostring(available), sold_out, full}
