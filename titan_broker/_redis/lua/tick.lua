-- Queue the run of a periodic method for one tick, unless a worker did
-- already: the tick is compared with the last one run and written in one
-- script, so with any number of workers each tick runs once. The run is a
-- job (status, outcome) queued on the service's stream like any call, so a
-- worker that dies running it leaves it to another.
-- A tick ahead of Redis's clock (a worker whose clock jumped) is refused, and
-- a last tick ahead of it (written so) does not count: one bad clock never
-- stops the schedule. While the previous tick's run has not started (queued
-- behind other calls, or no free worker), the tick is skipped: runs never
-- pile up. A run is not cut at the next tick (it has no deadline).
-- A tick more than the grace older than Redis's clock fell while no worker
-- was ticking (none alive, or all cut off): it is not made up, only noted,
-- so a deploy never fires a nightly job at noon; the next tick runs.
-- KEYS: schedule hash, calls stream, job hash, jobs index
-- ARGV: method, tick ms, next tick ms, job id, result ttl ms, job key prefix,
--       grace ms, field, value, ...
-- Returns 1 when this script queued the tick's run, 0 when it was queued
-- before (or the tick is ahead of Redis's clock), 2 when it was skipped (the
-- previous run has not started), 3 when it was too old to run.
-- include: jobs
local now, tick = redis_now_ms(), tonumber(ARGV[2])
if tick > now + 1000 then return 0 end
local last = tonumber(redis.call('HGET', KEYS[1], ARGV[1] .. ':last') or 0)
if last >= tick and last <= now + 1000 then return 0 end
local previous = redis.call('HGET', KEYS[1], ARGV[1] .. ':job')
redis.call('HSET', KEYS[1], ARGV[1] .. ':last', ARGV[2], ARGV[1] .. ':next', ARGV[3])
if tick < now - tonumber(ARGV[7]) then return 3 end
if previous then
  local token = string.match(previous, ':(.*)$')
  local state = token and redis.call('HGET', ARGV[6] .. token, 'status')
  if state == 'queued' or state == 'retrying' then return 2 end
end
local id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 8))
redis.call('HSET', KEYS[1], ARGV[1] .. ':job', ARGV[4])
new_job(KEYS[3], KEYS[4], ARGV[4], ARGV[1], now, ARGV[2], ARGV[5], 'entry', id)
return 1
