-- Queue the run of a periodic method for one tick, unless a worker did
-- already: the tick is compared with the last one run and written in one
-- script, so with any number of workers each tick runs once. The run is a
-- job (status, outcome) queued on the service's stream like any call, so a
-- worker that dies running it leaves it to another.
-- KEYS: schedule hash, calls stream, job hash, jobs index
-- ARGV: method, tick ms, next tick ms, job id, result ttl ms, field, value, ...
-- Returns 1 when this script queued the tick's run, 0 when it was queued before.
-- include: jobs
local last = tonumber(redis.call('HGET', KEYS[1], ARGV[1] .. ':last') or 0)
if last >= tonumber(ARGV[2]) then return 0 end
local id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 6))
redis.call('HSET', KEYS[1], ARGV[1] .. ':last', ARGV[2], ARGV[1] .. ':next', ARGV[3], ARGV[1] .. ':job', ARGV[4])
new_job(KEYS[3], KEYS[4], ARGV[4], ARGV[1], redis_now_ms(), ARGV[2], ARGV[5], 'entry', id)
return 1
