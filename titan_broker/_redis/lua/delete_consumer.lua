-- Remove a consumer only when its worker is gone and it holds nothing
-- pending: XGROUP DELCONSUMER would throw its pending entries away.
-- KEYS: calls stream, the consumer's worker record (not for a shard's stream
-- after the first: the records live in another slot, and the caller checked)
-- ARGV: group, consumer
-- Returns 1 when removed, -1 when the worker lives, -2 when it holds entries.
if KEYS[2] and redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #p > 0 then return -2 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
