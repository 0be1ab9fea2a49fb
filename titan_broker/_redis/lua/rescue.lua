-- Move the calls of a dead worker's own stream (read or not) onto the shared
-- stream, then drop that stream. Only once the worker's record is gone: a
-- live worker keeps its calls.
-- KEYS: its stream, the shared stream, [its record, the affinity set: on the
--   first shard; a shard after it has them in another slot, and the caller
--   checks the record first and leaves the affinity set to the first shard's]
-- ARGV: worker id
-- Returns how many calls moved, -1 when the worker lives.
-- include: moved_fields
if KEYS[3] and redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
local now = redis_now_ms()
local entries = redis.call('XRANGE', KEYS[1], '-', '+')
for _, e in ipairs(entries) do
  redis.call('XADD', KEYS[2], '*', unpack(moved_fields(e[2], e[1], now)))
end
redis.call('DEL', KEYS[1])
if KEYS[4] then redis.call('SREM', KEYS[4], ARGV[1]) end
return #entries
