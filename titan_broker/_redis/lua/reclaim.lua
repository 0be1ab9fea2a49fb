-- Claim entries idle longer than a heartbeat TTL (their worker stopped
-- renewing them: it is dead, or cut off) and return each with its delivery
-- count, walking the pending list from the cursor.
-- Read with XPENDING IDLE rather than XAUTOCLAIM: Redis 6.2's XAUTOCLAIM
-- returns nil, without an id, for entries deleted while pending (a caller
-- gave up on them), so those could never be acknowledged; and the entries
-- this worker is running itself are skipped (their renewal may have failed,
-- say on a full Redis, but they are not lost). The delivery count is set
-- explicitly (RETRYCOUNT), the same on 6.2 and 7.
-- KEYS: calls stream
-- ARGV: group, consumer, min idle ms, cursor ('-' or '(' .. id), count, ids this worker runs...
-- Returns {next cursor, {entry...}, {delivery count...}}.
local running = {}
for i = 6, #ARGV do running[ARGV[i]] = true end
local count = tonumber(ARGV[5])
local p = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], ARGV[4], '+', count)
local entries, counts = {}, {}
for _, e in ipairs(p) do
  local id = e[1]
  if not (e[2] == ARGV[2] and running[id]) then
    local found = redis.call('XRANGE', KEYS[1], id, id)
    if #found == 0 then
      redis.call('XACK', KEYS[1], ARGV[1], id)  -- deleted by its caller: nothing to run
    else
      local deliveries = e[4] + 1
      local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], id,
        'RETRYCOUNT', deliveries, 'JUSTID')
      if #claimed > 0 then
        entries[#entries + 1] = found[1]
        counts[#counts + 1] = deliveries
      end
    end
  end
end
local cursor = '-'
if #p == count then cursor = '(' .. p[#p][1] end  -- else the walk reached the end: start over
return {cursor, entries, counts}
