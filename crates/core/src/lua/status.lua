-- One consistent reading of a sku: its rules, its counters, and how many
-- reservations are overdue (past their deadline, not yet swept).
--
-- KEYS[1] stock hash   KEYS[2] reservation deadlines   KEYS[3] admitted requests
-- ARGV[1] now (ms)   ARGV[2] overbook when the sale has none
--
-- Returns {field1, value1, ...} (the stock hash plus "overdue",
-- "next_deadline_ms", empty when none, "queued", the purchases admitted
-- and not yet answered by a shop-worker, and "queue_limit", how many may
-- wait now), or {} when the sku has no stock.

local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then
  return {}
end
table.insert(fields, 'overdue')
table.insert(fields, tostring(redis.call('ZCOUNT', KEYS[2], '-inf', ARGV[1])))
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
table.insert(fields, 'next_deadline_ms')
table.insert(fields, first[2] or '')
table.insert(fields, 'queued')
table.insert(fields, tostring(redis.call('ZCARD', KEYS[3])))
local sale = redis.call('HMGET', KEYS[1], 'available', 'overbook')
table.insert(fields, 'queue_limit')
table.insert(fields, tostring(queue_limit(tonumber(sale[1]), tonumber(sale[2] or ARGV[2]))))
return fields
