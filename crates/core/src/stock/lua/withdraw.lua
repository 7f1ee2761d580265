-- Settles a reservation as not to be sold, before its order is cancelled:
-- reserved -> withdrawn, once. A withdrawn reservation is never committed
-- (commit.lua answers "released"), so whichever of a commit and a
-- withdrawal reaches Redis first decides the purchase, however many
-- sagas run for it at once and whatever their clocks say. Its units stay
-- reserved until the stock release (release.lua) or the sweep gives them
-- back, and their line is served then.
--
-- KEYS[1] stock hash   KEYS[2] reservation record
-- ARGV[1] reason
--
-- Returns {"withdrawn", reason} (now or by an earlier call: the first
-- reason), {"released", reason} (already given back), {"committed"} (sold:
-- the purchase was paid for, and its order must be confirmed, not
-- cancelled), {"missing"} (no record of this sale) or {"unloaded"}.

local sale = redis.call('HGET', KEYS[1], 'sale_id')
if not sale then
  return {'unloaded'}
end
local r = redis.call('HMGET', KEYS[2], 'state', 'sale_id', 'reason')
if not r[1] or r[2] ~= sale then
  return {'missing'}
end
if r[1] == 'committed' then
  return {'committed'}
end
if r[1] == 'released' or r[1] == 'withdrawn' then
  return {r[1], r[3] or ''}
end
redis.call('HSET', KEYS[2], 'state', 'withdrawn', 'reason', ARGV[1])
return {'withdrawn', ARGV[1]}
