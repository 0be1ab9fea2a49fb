-- Run a call again later (@retry): while this worker still owns its entry,
-- put the request (its fields as a msgpack map, attempt counted, ttl from
-- the due time) in the service's delayed set, due in ARGV[4] ms, and
-- acknowledge the entry. A job shows it: status retrying, the error it got.
-- A call whose caller gave up (it deleted the entry, or left its mark,
-- ``<ns>:{<svc>}:gone:<call id>``) is not run again.
-- KEYS: calls stream, delayed set, job hash (a job) or the call's gone mark
-- ARGV: entry id, group, consumer, due in ms, member, the error reply (a job) or ''
-- Returns 1 when done, 0 when the entry is no longer this worker's, 2 when
-- its caller gave up (acknowledged, not retried).
-- A retry due within the workers' wait between two looks wakes one (wake.lua).
-- include: settling
-- include: wake
if not owns(KEYS[1], ARGV[2], ARGV[1], ARGV[3]) then return 0 end
local job = ARGV[6] ~= ''
if not job and (redis.call('EXISTS', KEYS[3]) == 1
                or #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0) then
  redis.call('XACK', KEYS[1], ARGV[2], ARGV[1])
  redis.call('XDEL', KEYS[1], ARGV[1])
  return 2
end
local due = redis_now_ms() + tonumber(ARGV[4])
redis.call('ZADD', KEYS[2], due, ARGV[5])
wake_promoters(KEYS[2], tonumber(ARGV[4]))
if job then
  redis.call('HSET', KEYS[3], 'status', 'retrying', 'delayed', ARGV[5], 'due', due, 'result', ARGV[6])
  redis.call('HDEL', KEYS[3], 'entry')
end
redis.call('XACK', KEYS[1], ARGV[2], ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
return 1
