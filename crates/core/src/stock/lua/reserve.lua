-- Answers one purchase request, at most once per request id: reserves its
-- units (available -> reserved, with a deadline), puts it in the sku's line
-- when units may still come back but none is free for it, or rejects it.
--
-- KEYS[1] stock hash of the sku     KEYS[2] units held per user
-- KEYS[3] processed-request marker  KEYS[4] reservation record
-- KEYS[5] reservation deadlines (sorted set, score = deadline)
-- KEYS[6] requests the gateways admitted and no shop-worker has answered
--         yet (admit.lua); the line's keys are derived (line.lua)
-- ARGV[1] request id   ARGV[2] user id   ARGV[3] quantity   ARGV[4] now (ms)
-- ARGV[5] accepted at (ms)   ARGV[6] max queue age (ms)   ARGV[7] retention (ms)
-- ARGV[8] how many waiters one call may serve at most
--
-- Returns {answer, announcements} where answer is
--         {"reserved", expires_at_ms, amount_cents, sale_id}
--      or {"rejected", reason}
--      or {"waiting"}: in the line; its answer comes when a unit is free
--         for it or none can be (announced by whichever script decides)
--      or {"unloaded"}: the sku has no stock here (Redis was lost and not
--         yet recovered); nothing is written, the caller waits
--      or {"voided"}: its buyer was answered with a failure (void.lua);
--         nothing is done, nothing is told.
-- and announcements lists, as id, "<user> <quantity>", answer (JSON), the
-- other waiters this call served or turned away, for the caller to announce.
-- A replay returns the first final answer unchanged: the marker holds it.

local k = line_keys(KEYS[1])
local id, user, qty = ARGV[1], ARGV[2], tonumber(ARGV[3])
local now, accepted = tonumber(ARGV[4]), tonumber(ARGV[5])
-- Whatever the answer, this request no longer waits for a shop-worker, so
-- its place among the admitted is now counted by the line or the holders.
redis.call('ZREM', KEYS[6], id)
local prior = redis.call('GET', KEYS[3])
if prior then
  local answer = cjson.decode(prior)
  -- Voided (void.lua): a record accepted before then was answered with a
  -- failure and is never processed; one accepted after is the buyer's
  -- retry with the same key, processed as new.
  if answer[1] ~= 'voided' then
    -- The answer of an earlier sale's purchase under the same request id
    -- (the buyer reused an Idempotency-Key): not this purchase's.
    if reused(prior, sale_of(k)) then
      return {{'rejected', 'idempotency_key_reused'}, {}}
    end
    return {answer, {}}
  end
  if accepted <= tonumber(answer[2]) then
    return {{'voided'}, {}}
  end
  redis.call('DEL', KEYS[3])
end
if redis.call('ZSCORE', k.line, id) then
  return {{'waiting'}, {}}
end
local sale = sale_of(k)
if not sale then
  return {{'unloaded'}, {}}
end
sale.retention = tonumber(ARGV[7])
local out = {}
local function answer(result)
  settle_flags(k)
  return {result, out}
end

if sale.closed or now >= sale.ends then
  return answer(remember(k, sale, id, {'rejected', 'sale_not_active'}))
end
-- Sent before the opening: it draws its place among the early buyers, and
-- waits for the opening however long that takes.
local early = accepted < sale.starts
if not early and now - accepted > tonumber(ARGV[6]) then
  return answer(remember(k, sale, id, {'rejected', 'stale'}))
end
local held = tonumber(redis.call('HGET', KEYS[2], user) or '0')
if held + qty > sale.limit then
  return answer(remember(k, sale, id, {'rejected', 'user_limit'}))
end
if qty > sale.available + sale.reserved then
  return answer(remember(k, sale, id, {'rejected', 'sold_out'}))
end
if not early and now >= sale.starts and sale.available >= qty
    and redis.call('ZCARD', k.line) == 0 then
  return answer(take(k, sale, id, user, qty, now))
end
join(k, sale, id, user, qty, now, early)
serve_line(k, sale, now, tonumber(ARGV[8]), now + ANNOUNCE_GRACE_MS, out)
local mine = redis.call('GET', KEYS[3])
if not mine then
  return answer({'waiting'})
end
-- Decided in this very call: answered here, not announced with the others.
redis.call('ZREM', k.out, id)
redis.call('HDEL', k.who, id)
for i = 1, #out, 3 do
  if out[i] == id then
    table.remove(out, i)
    table.remove(out, i)
    table.remove(out, i)
    break
  end
end
return answer(cjson.decode(mine))
