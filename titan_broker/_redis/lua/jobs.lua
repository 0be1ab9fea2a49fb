-- What the scripts that make or end a job share. Included (see scripting.py).
-- A job's hash: status (queued, running, retrying, done, failed, dead,
-- cancelled), method, submitted and due (ms, Redis's clock), attempts,
-- result_ttl (ms), where its request is (entry: a stream entry id, or
-- delayed: its member of the delayed set) while it waits, queued (ms: when it
-- reached the stream), and once it ended, result (the reply, msgpack) and finished.
-- include: clock

-- A new job, queued; its id goes to the service's index of jobs (the newest 100,000).
local function new_job(key, index, id, method, now, due, result_ttl, where, at)
  redis.call('HSET', key, 'status', 'queued', 'method', method, 'submitted', now, 'due', due,
             'attempts', 0, 'result_ttl', result_ttl, where, at)
  if where == 'entry' then redis.call('HSET', key, 'queued', now) end
  redis.call('ZADD', index, now, id)
  redis.call('ZREMRANGEBYRANK', index, 0, -100001)
end

-- A job ended: its outcome, kept result_ttl ms from now.
local function end_job(key, status, reply)
  local ttl = tonumber(redis.call('HGET', key, 'result_ttl')) or 86400000
  redis.call('HSET', key, 'status', status, 'result', reply, 'finished', redis_now_ms())
  redis.call('HDEL', key, 'entry', 'delayed')
  redis.call('PEXPIRE', key, ttl)
end
