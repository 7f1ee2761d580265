-- Posts the state of a purchase, never moving it backwards.
--
-- KEYS[1] the purchase's status hash
-- ARGV[1] state  ARGV[2] rank  ARGV[3] reason  ARGV[4] now (ms)
-- ARGV[5] retention (ms)  ARGV[6] sku  ARGV[7] user id  ARGV[8] quantity
-- ARGV[9], ARGV[10] (only with `queued`): partition and offset of the
-- purchase's record, for its place in the queue
--
-- A purchase that reaches `waiting` keeps when (waiting_since_ms).
--
-- Publishes the request id on `fs:status` when it writes.
--
-- Returns 1 if written, 0 if the stored state is as far along or further
-- (terminal states share the top rank: the first one written stays).

local current = redis.call('HGET', KEYS[1], 'rank')
if current and tonumber(current) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'rank', ARGV[2], 'reason', ARGV[3],
  'updated_at_ms', ARGV[4], 'sku', ARGV[6], 'user_id', ARGV[7], 'quantity', ARGV[8])
if ARGV[10] then
  redis.call('HSET', KEYS[1], 'partition', ARGV[9], 'offset', ARGV[10])
end
-- Kept through the later states: how long the buyer waited in the line.
if ARGV[1] == 'waiting' then
  redis.call('HSET', KEYS[1], 'waiting_since_ms', ARGV[4])
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
-- Long-polls wait for this (status_board::STATUS_CHANNEL): the id only.
redis.call('PUBLISH', 'fs:status', string.match(KEYS[1], '{(.+)}$'))
return 1
