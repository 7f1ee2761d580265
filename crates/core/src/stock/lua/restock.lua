-- Adds units to a running sale: total and available grow, and the new
-- units go to the head of the line at once (line.lua); the sweep announces
-- the waiters served.
--
-- KEYS[1] stock hash   KEYS[2] this restock's marker
-- ARGV[1] units   ARGV[2] marker retention (ms)   ARGV[3] now (ms)
-- ARGV[4] how many waiters one call may serve at most
--
-- Returns {"restocked", total, available} (a replay with the same operation
-- id answers what the first call did) or {"unloaded"}.

local prior = redis.call('GET', KEYS[2])
if prior then
  return cjson.decode(prior)
end
local k = line_keys(KEYS[1])
local sale = sale_of(k)
if not sale then
  return {'unloaded'}
end
local total = redis.call('HINCRBY', KEYS[1], 'total', ARGV[1])
local available = redis.call('HINCRBY', KEYS[1], 'available', ARGV[1])
sale.available = available
local now = tonumber(ARGV[3])
-- Due at once: no caller announces them.
serve_line(k, sale, now, tonumber(ARGV[4]), now, {})
settle_flags(k)
local result = {'restocked', tostring(total), tostring(redis.call('HGET', KEYS[1], 'available'))}
redis.call('SET', KEYS[2], cjson.encode(result), 'PX', ARGV[2])
return result
