-- Run a call again later (@retry): while this worker still owns its entry,
-- put the request (its fields as a msgpack map, attempt counted, ttl from
-- the due time) in the service's delayed set, due in ARGV[4] ms, and
-- acknowledge the entry. A job shows it: status retrying, the error it got.
-- KEYS: calls stream, delayed set, [job hash]
-- ARGV: entry id, group, consumer, due in ms, member, [the error reply]
-- Returns 1 when done, 0 when the entry is no longer this worker's.
-- include: settling
if not owns(KEYS[1], ARGV[2], ARGV[1], ARGV[3]) then return 0 end
local due = redis_now_ms() + tonumber(ARGV[4])
redis.call('ZADD', KEYS[2], due, ARGV[5])
if KEYS[3] then
  redis.call('HSET', KEYS[3], 'status', 'retrying', 'delayed', ARGV[5], 'due', due, 'result', ARGV[6] or '')
  redis.call('HDEL', KEYS[3], 'entry')
end
redis.call('XACK', KEYS[1], ARGV[2], ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
return 1
