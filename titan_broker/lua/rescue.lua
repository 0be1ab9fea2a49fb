-- Move the calls of a dead worker's own stream (read or not) onto the shared
-- stream, counting the move in field x, then drop that stream. Only once the
-- worker's record is gone: a live worker keeps its calls. A moved entry gets
-- a new id, so its timeout (field ttl, counted from the id) is cut by the
-- time it already waited: its deadline does not move.
-- KEYS: its stream, the shared stream, its record, the affinity set
-- ARGV: worker id
-- Returns how many calls moved, -1 when the worker lives.
if redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local entries = redis.call('XRANGE', KEYS[1], '-', '+')
for _, e in ipairs(entries) do
  local f, out, moves = e[2], {}, 0
  local born = tonumber(string.match(e[1], '^(%d+)')) or now
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
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[4], ARGV[1])
return #entries
