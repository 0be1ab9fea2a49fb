-- Mark a job running as one of its runs starts: its status, worker and start time, and one
-- more run. A job that has ended already is left as it is: a stale run (its entry reclaimed from
-- a stalled worker that then resumed) may start after another run finished the job.
-- KEYS: job hash
-- ARGV: worker id, started (ms, Redis's clock)
-- A job this Redis does not have is not made: the run read its request from another server (an
-- old primary back from a stop, whose writes the failover loses), and a hash made here would
-- read as running for good, with no request left to run or end it.
-- Returns the runs counted so far, the job's status when it has ended, or 'unknown'.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'unknown' end
if status == 'done' or status == 'failed' or status == 'dead' or status == 'cancelled' then
  return status
end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'started', ARGV[2])
return redis.call('HINCRBY', KEYS[1], 'attempts', 1)
