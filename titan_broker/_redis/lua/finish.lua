-- Answer a call and acknowledge its entry, only if this worker still owns it.
-- A worker that was cut off (its heartbeat lapsed) may have lost the entry
-- to another worker's claim: then it writes nothing (returns 0), so a caller
-- never gets two answers from two runs. The reply goes first: if it cannot be
-- written (Redis out of memory) the script stops before XACK and the entry
-- stays pending, still owned, for another try.
-- KEYS: calls stream, [reply stream, or job hash]
-- ARGV: entry id, group, consumer, reply, reply ttl ms, [job status: done or failed]
-- Returns 1 when answered, 0 when the entry is no longer this worker's.
-- include: settling
if not owns(KEYS[1], ARGV[2], ARGV[1], ARGV[3]) then return 0 end
if KEYS[2] then answer(KEYS[2], ARGV[4], ARGV[5], ARGV[6]) end
redis.call('XACK', KEYS[1], ARGV[2], ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
return 1
