-- Mark a job running as one of its runs starts: its status, worker and start time, and one
-- more run. A job that has ended already is left as it is: a stale run (its entry reclaimed from
-- a stalled worker that then resumed) may start after another run finished the job.
-- KEYS: job hash
-- ARGV: worker id, started (ms, Redis's clock)
-- Returns the runs counted so far, or the job's status when it has ended.
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'done' or status == 'failed' or status == 'dead' or status == 'cancelled' then
  return status
end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'started', ARGV[2])
return redis.call('HINCRBY', KEYS[1], 'attempts', 1)
