-- Keep the entries this worker is running from looking idle, so nobody
-- claims them: XCLAIM ... JUSTID resets the idle time without counting a
-- delivery. Only entries still owned by this consumer are touched (never
-- take one back).
-- KEYS: calls stream; ARGV: group, consumer, ids...
-- Returns how many were renewed and how many another consumer holds now
-- (taken over); the rest were settled meanwhile.
-- include: settling
local mine, taken = {}, 0
for i = 3, #ARGV do
  if owns(KEYS[1], ARGV[1], ARGV[i], ARGV[2]) then
    mine[#mine + 1] = ARGV[i]
  else
    local ok, p = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
    if ok and #p > 0 then taken = taken + 1 end
  end
end
local n = #mine
if n > 0 then
  mine[n + 1] = 'JUSTID'  -- after the ids: unpack() expands only as the last argument
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(mine))
end
return {n, taken}
