-- Move an entry this worker owns to the dead letters, answer its caller if
-- it has one, then acknowledge and delete it. The reply goes first: if it
-- fails, nothing else has happened.
-- KEYS: calls stream, dead stream, [reply stream, or job hash]
-- ARGV: entry id, group, consumer, dead maxlen, reply, reply ttl ms,
--       job status ('dead') or '', field, value, ...
-- Returns 1 when done, 0 when the entry is no longer this worker's.
-- include: settling
if not owns(KEYS[1], ARGV[2], ARGV[1], ARGV[3]) then return 0 end
if KEYS[3] then answer(KEYS[3], ARGV[5], ARGV[6], ARGV[7]) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', unpack(ARGV, 8))
redis.call('XACK', KEYS[1], ARGV[2], ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
return 1
