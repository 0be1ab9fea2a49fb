-- Queue a job (its outcome kept in its hash, for whoever asks later) or a
-- call to run later (in the service's delayed set, due at now + delay), with
-- the checks of submit.lua: a full backlog, a caller's deadline already gone.
-- A delayed call's request is its member of the delayed set: its fields as
-- a msgpack map, whose ttl counts from its due time (promote.lua). The
-- backlog counts the delayed set too: what waits for later waits all the same.
-- KEYS: calls stream (the shared one, or a registered caller user's, whose
--       key the job's hash keeps as 'stream'), delayed set, [job hash, jobs index]
-- ARGV: config hash (read only), default limit, the caller's deadline ms
--       (Redis clock; for a job, the submit's) or 0, delay ms, member
--       (delayed) or '', job id or '', result ttl ms, method, field, value, ...
-- A call due within the workers' wait between two looks wakes one (wake.lua).
-- Returns the entry id, or 'delayed'; TITANBACKLOG and TITANLATE as submit.lua.
-- include: admission
-- include: jobs
-- include: wake
local full = backlog_full(ARGV[1], ARGV[2], KEYS[1], KEYS[2])
if full then return full end
local now = redis_now_ms()
local deadline, delay = tonumber(ARGV[3]) or 0, tonumber(ARGV[4]) or 0
local due = now + delay
if deadline > 0 and now >= deadline then
  return redis.error_reply('TITANLATE ' .. (now - deadline))
end
local where, at = 'delayed', ARGV[5]
if delay > 0 then
  redis.call('ZADD', KEYS[2], due, ARGV[5])  -- its ttl counts from its due time
  wake_promoters(KEYS[2], delay)
else
  -- A call is never queued to run past its caller's wait; a job's deadline is its own (the
  -- deadline here is only the submit's).
  if deadline > 0 and not KEYS[3] then cut_ttl(ARGV, 9, deadline - now) end
  where, at = 'entry', redis.call('XADD', KEYS[1], '*', unpack(ARGV, 9))
end
if KEYS[3] then
  new_job(KEYS[3], KEYS[4], ARGV[6], ARGV[8], now, due, ARGV[7], where, at)
  -- a registered caller user's stream: where cancelling finds the request
  if string.find(KEYS[1], '@', 1, true) then redis.call('HSET', KEYS[3], 'stream', KEYS[1]) end
end
if where == 'entry' then return at end
return 'delayed'
