-- Prepended (after flags.lua) to every script that moves a sku's line: the
-- buyers whose purchase reached a shop-worker while no unit was free for
-- them. A unit that comes back (a decline, an expiry, a restock) goes to
-- the head of the line inside the script that gave it back, so no buyer has
-- to ask again, and nobody behind the head can take it first.
--
-- The line's keys share the sku's hash tag and are derived here from the
-- stock hash's name, so every script stays on one Redis Cluster slot:
--   line       sorted set of waiting request ids, by place: a purchase sent
--              before the opening gets a ticket in [0, 1) drawn from a
--              salted hash of its id (a fair draw among early buyers, that
--              nobody can grind for); later ones get 1, 2, 3... in arrival
--              order, so they all stand behind the draw
--   line:who   request id -> "<user> <quantity>", until announced
--   line:seen  request id -> when its buyer last asked (ms); a buyer who
--              stops asking loses the place (serve.lua)
--   line:out   request ids whose answer was decided here and must still be
--              announced (reservation published, status posted), scored by
--              when the sweep should do it if the caller does not
--   admitted:ever  every request id the gateways admitted in this sale, so
--              a gateway can answer a repeated POST from memory

-- How long a caller has to announce what a script decided before the
-- sweep does it in its place.
local ANNOUNCE_GRACE_MS = 5000

-- Waiters a line keeps beyond ceil(overbook x units not sold) until the
-- last unit is sold (serve_line).
local LINE_RESERVE = 10

local function line_keys(stock)
  local p = string.sub(stock, 1, #stock - 5)
  return {
    stock = stock, users = p .. 'users', deadlines = p .. 'deadlines',
    admitted = p .. 'admitted', ever = p .. 'admitted:ever',
    line = p .. 'line', who = p .. 'line:who', seen = p .. 'line:seen',
    out = p .. 'line:out', marker = p .. 'req:', record = p .. 'res:',
  }
end

-- How many buyers may hold or wait for a unit at once:
-- ceil(overbook x units not sold yet). Less a hair, so that
-- 10 * 1.1 = 11.000000000000002 allows 11, not 12.
local function line_cap(k)
  local s = redis.call('HMGET', k.stock, 'available', 'reserved', 'overbook')
  local unsold = math.max((tonumber(s[1]) or 0) + (tonumber(s[2]) or 0), 0)
  return math.ceil(unsold * (tonumber(s[3]) or 1) - 1e-9)
end

-- Buyers holding a unit, waiting for one, or on their way (let in by a
-- gateway, not yet seen by a shop-worker).
local function line_people(k)
  return redis.call('ZCARD', k.deadlines) + redis.call('ZCARD', k.line)
    + redis.call('ZCARD', k.admitted)
end

-- Recomputes the flags the gateways answer from memory, and publishes
-- them once if either changed: sold_out (no unit free) and line_full (no
-- room for one more buyer: every unit is sold or spoken for).
local function settle_flags(k)
  local s = redis.call('HMGET', k.stock, 'available', 'sold_out', 'line_full')
  local sold_out = (tonumber(s[1]) or 0) <= 0 and '1' or '0'
  local full = line_people(k) >= line_cap(k) and '1' or '0'
  if s[2] ~= sold_out or s[3] ~= full then
    redis.call('HSET', k.stock, 'sold_out', sold_out, 'line_full', full)
    publish_flags(k.stock)
  end
end

local function sale_of(k)
  local s = redis.call('HMGET', k.stock, 'available', 'reserved', 'per_user_limit',
    'price_cents', 'ttl_ms', 'starts_at_ms', 'ends_at_ms', 'sale_id', 'closed',
    'retention_ms')
  if not s[1] then
    return nil
  end
  return {
    available = tonumber(s[1]), reserved = tonumber(s[2]), limit = tonumber(s[3]),
    price = tonumber(s[4]), ttl = tonumber(s[5]), starts = tonumber(s[6]),
    ends = tonumber(s[7]), sale_id = s[8], closed = s[9] == '1',
    retention = tonumber(s[10]) or 86400000,
  }
end

-- Whether a processed marker's answer (JSON) reserved units of another
-- sale than `sale`: the request id, derived from the buyer and the
-- Idempotency-Key, was used in an earlier sale of the sku.
local function reused(marker, sale)
  if not sale or string.sub(marker, 1, 11) ~= '["reserved"' then
    return false
  end
  local answer = cjson.decode(marker)
  return answer[4] ~= sale.sale_id
end

local function remember(k, sale, id, answer)
  redis.call('SET', k.marker .. id, cjson.encode(answer), 'PX', sale.retention)
  return answer
end

-- available -> reserved for one purchase, with a deadline. The caller has
-- checked that the units are free and the buyer may hold them.
local function take(k, sale, id, user, qty, now)
  redis.call('HINCRBY', k.stock, 'available', -qty)
  redis.call('HINCRBY', k.stock, 'reserved', qty)
  redis.call('HINCRBY', k.users, user, qty)
  sale.available = sale.available - qty
  sale.reserved = sale.reserved + qty
  local expires = now + sale.ttl
  local record = k.record .. id
  redis.call('HSET', record, 'user', user, 'quantity', qty, 'expires_at_ms', expires,
    'state', 'reserved', 'sale_id', sale.sale_id)
  -- The record outlives its deadline by the retention, so a late commit or
  -- release still finds it.
  redis.call('PEXPIRE', record, sale.ttl + sale.retention)
  redis.call('ZADD', k.deadlines, expires, id)
  return remember(k, sale, id,
    {'reserved', tostring(expires), tostring(qty * sale.price), sale.sale_id})
end

-- A waiter's place, drawn before the opening or in arrival order after.
local function place(k, sale, id, early)
  if early then
    local salt = redis.call('HGET', k.stock, 'line_salt') or sale.sale_id
    return tonumber(string.sub(redis.sha1hex(salt .. id), 1, 12), 16) / 281474976710656
  end
  return redis.call('HINCRBY', k.stock, 'line_seq', 1)
end

local function join(k, sale, id, user, qty, now, early)
  redis.call('ZADD', k.line, place(k, sale, id, early), id)
  redis.call('HSET', k.who, id, user .. ' ' .. qty)
  redis.call('ZADD', k.seen, math.max(now, sale.starts), id)
end

-- Takes a waiter out of the line with its final answer, to be announced
-- by the caller (appended to `out` as id, who, answer) or, failing that,
-- by the sweep once `due` has passed.
local function leave(k, sale, id, answer, due, out)
  redis.call('ZREM', k.line, id)
  redis.call('ZREM', k.seen, id)
  remember(k, sale, id, answer)
  local who = redis.call('HGET', k.who, id)
  if who then
    redis.call('ZADD', k.out, due, id)
    table.insert(out, id)
    table.insert(out, who)
    table.insert(out, cjson.encode(answer))
  end
end

-- Serves the line from its head while units are free (strictly in order:
-- a head that wants more units than are free waits, and nobody passes it),
-- then trims its tail while more buyers wait than ceil(overbook x units
-- not sold): as units sell, fewer can come back, and a buyer that far back
-- has next to no chance left. Units come back to the line through a slower
-- path (a decline travels through the order stage and `stock-releases`)
-- than sales shorten it, so the line keeps `overbook` waiters per unit
-- still held rather than one, and LINE_RESERVE more until the last unit is
-- sold. A closed or ended sale turns its waiters away. At most `limit`
-- waiters are served or turned away.
local function serve_line(k, sale, now, limit, due, out)
  local done = 0
  if sale.closed or now >= sale.ends then
    if limit > 0 then
      for _, id in ipairs(redis.call('ZRANGE', k.line, 0, limit - 1)) do
        leave(k, sale, id, {'rejected', 'sale_not_active'}, due, out)
      end
    end
    return
  end
  if now < sale.starts then
    return
  end
  while done < limit do
    local head = redis.call('ZRANGE', k.line, 0, 0)[1]
    if not head then
      break
    end
    local who = redis.call('HGET', k.who, head) or ''
    local user, qty = string.match(who, '^(%S+) (%d+)$')
    qty = tonumber(qty)
    if not qty or qty > sale.available + sale.reserved then
      leave(k, sale, head, {'rejected', 'sold_out'}, due, out)
    elseif qty > sale.available then
      break
    elseif tonumber(redis.call('HGET', k.users, user) or '0') + qty > sale.limit then
      leave(k, sale, head, {'rejected', 'user_limit'}, due, out)
    else
      leave(k, sale, head, take(k, sale, head, user, qty, now), due, out)
    end
    done = done + 1
  end
  -- The last waiters stay until every unit is sold: the last units are the
  -- ones whose chain of declines may outlast a short line.
  local keep = line_cap(k)
  if sale.available + sale.reserved > 0 then
    keep = keep + LINE_RESERVE
  end
  local over = redis.call('ZCARD', k.line) - keep
  while over > 0 do
    local tail = redis.call('ZRANGE', k.line, -1, -1)[1]
    if not tail then
      break
    end
    leave(k, sale, tail, {'rejected', 'sold_out'}, due, out)
    over = over - 1
  end
end

