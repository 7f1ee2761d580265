-- Where a waiting purchase stands, read when its buyer asks; asking keeps
-- the place (serve.lua turns away buyers who stopped asking).
--
-- KEYS[1] stock hash
-- ARGV[1] request id   ARGV[2] now (ms)
--
-- Returns {} when the purchase is not in the line, else {position (1 =
-- the next unit that comes back is its), units that may still come back
-- (held by buyers who have not paid yet), the latest deadline of those
-- units (ms, "" when none)}.

local k = line_keys(KEYS[1])
local rank = redis.call('ZRANK', k.line, ARGV[1])
if not rank then
  return {}
end
redis.call('ZADD', k.seen, 'XX', 'GT', ARGV[2], ARGV[1])
local last = redis.call('ZRANGE', k.deadlines, -1, -1, 'WITHSCORES')
return {tostring(rank + 1), tostring(redis.call('HGET', k.stock, 'reserved') or 0),
  last[2] or ''}
