-- Makes sure a purchase whose buyer is about to be answered with a failure
-- (its produce timed out or failed, so whether Kafka has it is unknown) is
-- never processed later: unless a shop-worker already answered it, its
-- processed marker is set to ["voided", now], which reserve.lua answers
-- without reserving for any record of it accepted before then. A retry
-- with the same Idempotency-Key is accepted later, so it is processed
-- (unless it is voided in its turn: the marker then takes the later time).
-- Its place among the admitted is given back.
--
-- KEYS[1] stock hash   KEYS[2] the request's processed marker
-- ARGV[1] request id   ARGV[2] now (ms)   ARGV[3] retention (ms)
--
-- Returns {"voided"} or {"processed", answer}: a shop-worker answered it
-- (reserve's answer, or ["waiting"] while it is in the line); the buyer is
-- then told that, not a failure.

local k = line_keys(KEYS[1])
redis.call('ZREM', k.admitted, ARGV[1])
if redis.call('ZSCORE', k.line, ARGV[1]) then
  return {'processed', '["waiting"]'}
end
local voided = cjson.encode({'voided', tonumber(ARGV[2])})
if redis.call('SET', KEYS[2], voided, 'NX', 'PX', ARGV[3]) then
  return {'voided'}
end
local answer = redis.call('GET', KEYS[2])
if string.sub(answer, 1, 10) == '["voided",' then
  -- Voided before, and a retry (accepted after that void) failed too:
  -- the marker takes the later time, or the retry's record, arriving
  -- late, would be processed although its buyer was told it failed.
  if tonumber(ARGV[2]) > tonumber(cjson.decode(answer)[2]) then
    redis.call('SET', KEYS[2], voided, 'PX', ARGV[3])
  end
  return {'voided'}
end
return {'processed', answer}
