-- Hand a call for a method this worker lacks to a worker that has it (a
-- rolling upgrade: old and new versions serve side by side): copy the entry
-- onto that worker's own stream, counting the move in field x and cutting
-- its timeout by the time it waited (as rescue.lua does), then acknowledge
-- and delete it here. Only while this worker owns the entry and the target
-- lives.
-- KEYS: calls stream, target's own stream, target's record
-- ARGV: entry id, group, consumer
-- Returns 1 when handed over, 0 when the entry is not ours, -1 when the target is gone.
local ok, p = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[2], ARGV[1], ARGV[1], 1, ARGV[3])
if not ok or #p == 0 then return 0 end
if redis.call('EXISTS', KEYS[3]) == 0 then return -1 end
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local born = tonumber(string.match(ARGV[1], '^(%d+)')) or now
local f, out, moves = found[1][2], {}, 0
for i = 1, #f, 2 do
  if f[i] == 'x' then
    moves = tonumber(f[i + 1]) or 0
  elseif f[i] == 'ttl' then
    out[#out + 1] = 'ttl'
    out[#out + 1] = tostring(math.max(0, (tonumber(f[i + 1]) or 0) - (now - born)))
  else
    out[#out + 1] = f[i]
    out[#out + 1] = f[i + 1]
  end
end
out[#out + 1] = 'x'
out[#out + 1] = tostring(moves + 1)
redis.call('XADD', KEYS[2], '*', unpack(out))
redis.call('XACK', KEYS[1], ARGV[2], ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
return 1
