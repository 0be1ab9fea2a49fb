-- What the scripts that settle an entry share. Included (see scripting.py).

-- Whether `consumer` still holds entry `id` of `stream` (pending for it in
-- `group`). A worker cut off from Redis may have lost its entries to another
-- worker's claim; a stream deleted under it holds nothing (pcall: NOGROUP).
local function owns(stream, group, id, consumer)
  local ok, p = pcall(redis.call, 'XPENDING', stream, group, id, id, 1, consumer)
  return ok and #p > 0
end

-- The ids of `stream` pending for `consumer` in `group` from `first` to
-- `last`, as a set: one look for a batch of entries (see owns).
local function pending_for(stream, group, consumer, first, last)
  local held = {}
  local ok, p = pcall(redis.call, 'XPENDING', stream, group, first, last, 1000000000, consumer)
  if ok then
    for _, e in ipairs(p) do held[e[1]] = true end
  end
  return held
end

-- Whether stream entry id `a` (`<ms>-<seq>`, decimal) comes before `b`: the
-- longer number is the larger, digits compare as text (no pattern, no number).
local function id_before(a, b)
  local i, j = string.find(a, '-', 1, true), string.find(b, '-', 1, true)
  if i ~= j then return i < j end
  local am, bm = string.sub(a, 1, i - 1), string.sub(b, 1, j - 1)
  if am ~= bm then return am < bm end
  if #a ~= #b then return #a < #b end
  return a < b
end

-- A reply stream lives `ttl_ms` past its last reply.
local function keep_expiring(key, ttl_ms)
  redis.call('PEXPIRE', key, ttl_ms)
end

-- Add a reply to a caller's reply stream and keep the stream's TTL (at the
-- end of the script, once per stream, when `expiring` collects them).
local function add_reply(key, reply, ttl_ms, expiring)
  redis.call('XADD', key, '*', 'reply', reply)
  if expiring then expiring[key] = ttl_ms else keep_expiring(key, ttl_ms) end
end

-- include: jobs

-- Answer a call: a reply on its caller's stream, or, for a job (`job_status`
-- is then 'done', 'failed' or 'dead'), its outcome kept in the job's hash.
local function answer(key, reply, ttl_ms, job_status, expiring)
  if job_status and job_status ~= '' then
    end_job(key, job_status, reply)
  else
    add_reply(key, reply, ttl_ms, expiring)
  end
end
