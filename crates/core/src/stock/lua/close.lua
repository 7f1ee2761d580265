-- Closes a sale: new requests are rejected (sale_not_active), and so are
-- the buyers in its line (by the sweep, serve.lua); reservations already
-- made still commit or are released.
--
-- KEYS[1] stock hash
-- Returns {"closed"} or {"unloaded"}.

if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'unloaded'}
end
set_flag(KEYS[1], 'closed', '1')
return {'closed'}
