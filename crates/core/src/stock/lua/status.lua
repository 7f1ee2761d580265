-- One consistent reading of a sku: its rules, its counters, how many
-- reservations are overdue (past their deadline, not yet swept), and its
-- line.
--
-- KEYS[1] stock hash   KEYS[2] reservation deadlines   KEYS[3] admitted requests
-- ARGV[1] now (ms)
--
-- Returns {field1, value1, ...} (the stock hash plus "overdue",
-- "next_deadline_ms", empty when none, "queued", the purchases admitted
-- and not yet seen by a shop-worker, "waiting", the buyers in the line,
-- "holders", the reservations not yet sold or given back, and "line_cap",
-- how many buyers may hold, wait or be on their way at once), or {} when
-- the sku has no stock.

local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then
  return {}
end
local k = line_keys(KEYS[1])
local function add(name, value)
  table.insert(fields, name)
  table.insert(fields, tostring(value))
end
add('overdue', redis.call('ZCOUNT', KEYS[2], '-inf', ARGV[1]))
add('next_deadline_ms', redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')[2] or '')
add('queued', redis.call('ZCARD', KEYS[3]))
add('waiting', redis.call('ZCARD', k.line))
add('holders', redis.call('ZCARD', KEYS[2]))
add('line_cap', line_cap(k))
return fields
