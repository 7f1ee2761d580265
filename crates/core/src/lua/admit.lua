-- Lets one purchase into its sku's queue, or says why not. The queue holds
-- at most ceil(available * overbook) purchases that no shop-worker has
-- reserved or rejected yet, so the Kafka backlog of a sku follows its stock,
-- not its traffic; every gateway instance shares this one window.
--
-- KEYS[1] stock hash   KEYS[2] admitted requests (sorted set, score =
-- admitted at, ms; reserve.lua removes each as it answers it)
-- KEYS[3] the request's processed marker (written by reserve.lua)
-- ARGV[1] request id   ARGV[2] now (ms)   ARGV[3] lease (ms): an entry that
-- old is dropped, so a gateway that died between admitting and producing
-- does not narrow the window for ever   ARGV[4] overbook when the sale has none
--
-- Returns {"admitted"}
--      or {"duplicate", admitted_at}: admitted before, not answered yet
--      or {"processed", answer}: a shop-worker answered it (reserve's answer)
--      or {"full", queued, limit}: the window is full, units may come back
--      or {"sold_out"}
--      or {"not_active", starts_in_ms}: closed, over, or not open yet
--         (starts_in_ms is "" unless it opens later)
--      or {"unknown"}: Redis holds no stock for the sku

local sale = redis.call('HMGET', KEYS[1], 'available', 'overbook', 'closed',
  'starts_at_ms', 'ends_at_ms')
if not sale[1] then
  return {'unknown'}
end
local id, now = ARGV[1], tonumber(ARGV[2])
local answer = redis.call('GET', KEYS[3])
if answer then
  return {'processed', answer}
end
local admitted_at = redis.call('ZSCORE', KEYS[2], id)
if admitted_at then
  return {'duplicate', admitted_at}
end
if sale[3] == '1' or now >= tonumber(sale[5]) then
  return {'not_active', ''}
end
if now < tonumber(sale[4]) then
  return {'not_active', tostring(tonumber(sale[4]) - now)}
end
local available = tonumber(sale[1])
if available <= 0 then
  return {'sold_out'}
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[3]))
local limit = queue_limit(available, tonumber(sale[2] or ARGV[4]))
local queued = redis.call('ZCARD', KEYS[2])
if queued >= limit then
  return {'full', tostring(queued), tostring(limit)}
end
redis.call('ZADD', KEYS[2], now, id)
return {'admitted'}
