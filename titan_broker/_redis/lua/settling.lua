-- What the scripts that settle an entry share. Included (see scripting.py).

-- Whether `consumer` still holds entry `id` of `stream` (pending for it in
-- `group`). A worker cut off from Redis may have lost its entries to another
-- worker's claim; a stream deleted under it holds nothing (pcall: NOGROUP).
local function owns(stream, group, id, consumer)
  local ok, p = pcall(redis.call, 'XPENDING', stream, group, id, id, 1, consumer)
  return ok and #p > 0
end

-- Add a reply to a caller's reply stream and keep the stream's TTL.
local function add_reply(key, reply, ttl_ms)
  redis.call('XADD', key, '*', 'reply', reply)
  redis.call('PEXPIRE', key, ttl_ms)
end

-- include: jobs

-- Answer a call: a reply on its caller's stream, or, for a job (`job_status`
-- is then 'done', 'failed' or 'dead'), its outcome kept in the job's hash.
local function answer(key, reply, ttl_ms, job_status)
  if job_status and job_status ~= '' then
    end_job(key, job_status, reply)
  else
    add_reply(key, reply, ttl_ms)
  end
end
