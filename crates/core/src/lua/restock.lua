-- Adds units to a running sale: total and available grow, sold out clears.
--
-- KEYS[1] stock hash   KEYS[2] this restock's marker
-- ARGV[1] units   ARGV[2] marker retention (ms)
--
-- Returns {"restocked", total, available} (a replay with the same operation
-- id answers what the first call did) or {"unloaded"}.

local prior = redis.call('GET', KEYS[2])
if prior then
  return cjson.decode(prior)
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'unloaded'}
end
local total = redis.call('HINCRBY', KEYS[1], 'total', ARGV[1])
local available = redis.call('HINCRBY', KEYS[1], 'available', ARGV[1])
if available > 0 then
  set_flag(KEYS[1], 'sold_out', '0')
end
local result = {'restocked', tostring(total), tostring(available)}
redis.call('SET', KEYS[2], cjson.encode(result), 'PX', ARGV[2])
return result
