-- Lets one purchase into its sku's line, or says why not. At most
-- ceil(overbook x units not sold yet) buyers may hold a unit, wait in the
-- line, or be on their way to it (admitted here, not yet seen by a
-- shop-worker), so the backlog of a sku follows its stock, not its
-- traffic; every gateway instance shares this one bound. Beyond it every
-- unit is sold or spoken for by the buyers ahead: a final "sold out".
--
-- KEYS[1] stock hash   KEYS[2] admitted requests (sorted set, score =
-- admitted at, ms; reserve.lua removes each as it answers it)
-- KEYS[3] the request's processed marker (written by reserve.lua)
-- ARGV[1] request id   ARGV[2] now (ms), or "" for Redis's own clock: the
-- one clock every gateway shares, whatever theirs say
-- ARGV[3] lease (ms): an entry that old is dropped, so a gateway that
-- died between admitting and producing does not narrow the line for ever
--
-- Returns {"admitted", now} (also published on `fs:admitted` as "<sku> <id>")
--      or {"duplicate", admitted_at, now}: admitted before, not answered yet
--      or {"processed", answer}: a shop-worker answered it (reserve's
--         answer, or ["waiting"] while it is in the line)
--      or {"full", people, cap}: every unit is spoken for
--      or {"sold_out"}: every unit is sold
--      or {"not_active"}: closed or over
--      or {"reused"}: the key named a purchase of an earlier sale of the sku
--      or {"unknown"}: Redis holds no stock for the sku

local k = line_keys(KEYS[1])
local sale = sale_of(k)
if not sale then
  return {'unknown'}
end
local id, now = ARGV[1], tonumber(ARGV[2])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local answer = redis.call('GET', KEYS[3])
-- A voided purchase (void.lua) asked again: admitted as new.
if answer and string.sub(answer, 1, 10) ~= '["voided",' then
  -- Reserved in an earlier sale of the sku: the key was used before.
  if reused(answer, sale) then
    return {'reused'}
  end
  return {'processed', answer}
end
if redis.call('ZSCORE', k.line, id) then
  return {'processed', '["waiting"]'}
end
local admitted_at = redis.call('ZSCORE', KEYS[2], id)
if admitted_at then
  return {'duplicate', admitted_at, tostring(now)}
end
if sale.closed or now >= sale.ends then
  return {'not_active'}
end
if sale.available + sale.reserved <= 0 then
  settle_flags(k)
  return {'sold_out'}
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[3]))
local people, cap = line_people(k), line_cap(k)
if people >= cap then
  settle_flags(k)
  return {'full', tostring(people), tostring(cap)}
end
redis.call('ZADD', KEYS[2], now, id)
redis.call('SADD', k.ever, id)
local sku = string.match(KEYS[1], '^fs:{(.+)}:stock$') or KEYS[1]
redis.call('PUBLISH', 'fs:admitted', sku .. ' ' .. id)
settle_flags(k)
return {'admitted', tostring(now)}
