-- Claim entries idle longer than a heartbeat TTL (their worker stopped
-- renewing them: it is dead) and return each with its delivery count,
-- continuing the walk of the pending list from the cursor.
-- Claimed with JUSTID, then read: Redis 6.2 returns nil in place of entries
-- deleted while pending (a caller gave up on them), without their ids, so
-- those would never be acknowledged. JUSTID does not count a delivery, so
-- the count is set explicitly (RETRYCOUNT), the same on 6.2 and 7.
-- KEYS: calls stream; ARGV: group, consumer, min idle ms, cursor, count
-- Returns {next cursor, {entry...}, {delivery count...}}.
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5], 'JUSTID')
local entries, counts = {}, {}
for _, id in ipairs(r[2]) do
  local found = redis.call('XRANGE', KEYS[1], id, id)
  if #found == 0 then
    redis.call('XACK', KEYS[1], ARGV[1], id)  -- deleted by its caller: nothing to run
  else
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
    local deliveries = (p[1] and p[1][4] or 0) + 1
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'RETRYCOUNT', deliveries, 'JUSTID')
    entries[#entries + 1] = found[1]
    counts[#counts + 1] = deliveries
  end
end
return {r[1], entries, counts}
