-- The sweep's round over one sku's line (line.lua): turns away the buyers
-- who stopped asking for their place, serves the head while units are free
-- (a sale that just opened serves its early buyers in the order of the
-- draw), trims the tail, turns the line away when the sale closed, and
-- hands back what was decided and not yet announced (by a caller that died,
-- or by a script whose caller does not announce, like a restock).
--
-- KEYS[1] stock hash
-- ARGV[1] now (ms)   ARGV[2] patience (ms): a waiter whose buyer has not
-- asked for this long leaves the line (rejected, "stale")
-- ARGV[3] how many waiters one call may serve or turn away at most
--
-- Returns announcements as in reserve.lua: this call's decisions and the
-- earlier ones that are due.

local k = line_keys(KEYS[1])
local sale = sale_of(k)
if not sale then
  return {}
end
local now, limit = tonumber(ARGV[1]), tonumber(ARGV[3])
local out = {}
-- Due at once: this caller announces them now.
local due = now
if now >= sale.starts then
  local gone = redis.call('ZRANGEBYSCORE', k.seen, '-inf',
    '(' .. (now - tonumber(ARGV[2])), 'LIMIT', 0, limit)
  for _, id in ipairs(gone) do
    leave(k, sale, id, {'rejected', 'stale'}, due, out)
  end
end
serve_line(k, sale, now, limit, due, out)
settle_flags(k)
local decided = {}
for i = 1, #out, 3 do
  decided[out[i]] = true
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', k.out, '-inf', now, 'LIMIT', 0, limit)) do
  if not decided[id] then
    local answer = redis.call('GET', k.marker .. id)
    local who = redis.call('HGET', k.who, id)
    if answer and who then
      table.insert(out, id)
      table.insert(out, who)
      table.insert(out, answer)
    else
      -- The answer outlived its retention: nothing left to announce.
      redis.call('ZREM', k.out, id)
      redis.call('HDEL', k.who, id)
    end
  end
end
return out
