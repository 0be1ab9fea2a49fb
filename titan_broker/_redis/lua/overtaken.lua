-- Drop a reclaimed run of a periodic tick that a later tick has overtaken:
-- a worker died running it, and since then the schedule's next tick has come
-- due (queued, skipped, or not yet reached by any worker). Running it now
-- would put it beside the current tick's run, and after an outage pile up
-- the runs of every tick the dead workers had in flight; the schedule goes
-- on from its latest tick instead. The entry is acknowledged and its job
-- marked cancelled. A run whose tick is still the latest is left to run again.
-- A last tick ahead of Redis's clock (a worker whose clock jumped) says nothing.
-- KEYS: calls stream, schedule hash, job hash
-- ARGV: group, entry id, consumer, method, tick ms
-- Returns 1 when the run was dropped (or is no longer this worker's), 0 when it should run.
-- include: settling
if not owns(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return 1 end
local now, tick = redis_now_ms(), tonumber(ARGV[5])
local last = tonumber(redis.call('HGET', KEYS[2], ARGV[4] .. ':last') or 0)
local following = tonumber(redis.call('HGET', KEYS[2], ARGV[4] .. ':next') or 0)
if last > now + 1000 then return 0 end
if not (last > tick or (last == tick and following > tick and following <= now)) then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if redis.call('EXISTS', KEYS[3]) == 1 then end_job(KEYS[3], 'cancelled', '') end
return 1
