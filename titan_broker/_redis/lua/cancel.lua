-- Cancel a job that has not started: delete its request (its stream entry,
-- unless a worker has it already, or its member of the delayed set) and
-- mark it cancelled, kept for its result ttl.
-- KEYS: job hash, calls stream, delayed set
-- ARGV: group
-- Returns 'cancelled', or the status that kept it from being cancelled
-- ('running' when a worker has it), or 'unknown' (no such job, or expired).
-- include: jobs
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'unknown' end
if status ~= 'queued' and status ~= 'retrying' then return status end
local member = redis.call('HGET', KEYS[1], 'delayed')
if member then
  if redis.call('ZREM', KEYS[3], member) == 0 then return 'running' end
else
  local id = redis.call('HGET', KEYS[1], 'entry')
  if not id then return status end
  local ok, p = pcall(redis.call, 'XPENDING', KEYS[2], ARGV[1], id, id, 1)
  if ok and #p > 0 then return 'running' end
  if redis.call('XDEL', KEYS[2], id) == 0 then return 'running' end
end
end_job(KEYS[1], 'cancelled', '')
return 'cancelled'
