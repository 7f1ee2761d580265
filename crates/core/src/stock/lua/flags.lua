-- Prepended to every script that can change whether a sku is sold out,
-- closed, or has room in its line. A change is published on the channel
-- `fs:sku-flags` (stock::FLAGS_CHANNEL) as
-- "<sku> <sold_out> <closed> <line_full> <ends_at_ms>", so each gateway's
-- in-memory copy
-- follows within a round trip instead of asking Redis on every purchase.
-- Published from inside the script, so no change can happen without its
-- message: a gateway misses one only while disconnected, and then rereads
-- every sku when it resubscribes.

local function publish_flags(stock)
  local flags = redis.call('HMGET', stock, 'sold_out', 'closed', 'line_full', 'ends_at_ms')
  local sku = string.match(stock, '^fs:{(.+)}:stock$') or stock
  redis.call('PUBLISH', 'fs:sku-flags',
    sku .. ' ' .. (flags[1] or '0') .. ' ' .. (flags[2] or '0') .. ' ' .. (flags[3] or '0')
    .. ' ' .. (flags[4] or '0'))
end

local function set_flag(stock, field, value)
  if redis.call('HGET', stock, field) ~= value then
    redis.call('HSET', stock, field, value)
    publish_flags(stock)
  end
end

