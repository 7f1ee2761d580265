-- Prepended to the scripts that need the size of a sku's admission window:
-- admit.lua, which enforces it, and status.lua, which shows it.

-- At most this many purchases may wait in the sku's queue. Less a hair, so
-- that 10 * 1.1 = 11.000000000000002 allows 11, not 12.
local function queue_limit(available, overbook)
  return math.ceil(math.max(available, 0) * overbook - 1e-9)
end

