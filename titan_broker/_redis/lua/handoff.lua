-- Hand a call for a method this worker lacks to a worker that has it (a
-- rolling upgrade: old and new versions serve side by side): copy the entry
-- onto that worker's own stream, then acknowledge and delete it here. Only
-- while this worker owns the entry and the target lives.
-- KEYS: calls stream, target's own stream (in the same shard), [target's record:
--   on the first shard; a shard after it has the record in another slot: there
--   the target's own stream must exist (made when it starts, deleted when a
--   dead worker's is rescued), so a call is never handed to a stream nobody
--   reads or rescues]
-- ARGV: entry id, group, consumer
-- Returns 1 when handed over, 0 when the entry is not ours, -1 when the target is gone.
-- include: moved_fields
-- include: settling
if not owns(KEYS[1], ARGV[2], ARGV[1], ARGV[3]) then return 0 end
if KEYS[3] and redis.call('EXISTS', KEYS[3]) == 0 then return -1 end
if not KEYS[3] and redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', unpack(moved_fields(found[1][2], ARGV[1], redis_now_ms())))
redis.call('XACK', KEYS[1], ARGV[2], ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
return 1
