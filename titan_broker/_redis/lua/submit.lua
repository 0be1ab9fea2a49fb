-- Queue a call, unless the service's backlog is full or its caller has given up.
-- Acknowledged entries are deleted, so a stream's length is its backlog
-- (unread plus in progress). The limit is the one the service's workers
-- publish in its config hash, else the client's default. A call with an
-- affinity key goes to its worker's own stream while that worker lives (its
-- record exists), else to the shared stream.
-- A request that reaches Redis after its caller's deadline (it sat in a
-- socket while Redis was stopped or unreachable, and the caller gave up) is
-- refused, and one that arrives late but in time has its timeout cut to what
-- is left: a call is never queued to run after its caller stopped waiting.
-- The deadline is in Redis's clock (the client estimates its offset from the
-- entry ids it gets back); 0 means none.
-- The config hash and the worker record are only read, and named in ARGV,
-- not KEYS: Redis's ACL takes every key of EVALSHA as read-write, and a
-- caller may only read them. They share the streams' hash tag (same slot).
-- KEYS: calls stream, [shared stream: when KEYS[1] is a worker's own stream]
-- ARGV: config hash, worker record or "", default limit, deadline ms (Redis
--       clock) or 0, field, value, ...
-- Returns the new entry's id; error TITANBACKLOG <limit> when full,
-- TITANLATE <ms late> after the deadline.
-- include: admission
local stream = KEYS[1]
if ARGV[2] ~= '' and redis.call('EXISTS', ARGV[2]) == 0 then stream = KEYS[2] end
local full = backlog_full(ARGV[1], ARGV[3], stream)
if full then return full end
local deadline = tonumber(ARGV[4]) or 0
if deadline > 0 then
  local now = redis_now_ms()
  if now >= deadline then
    return redis.error_reply('TITANLATE ' .. (now - deadline))
  end
  cut_ttl(ARGV, 5, deadline - now)
end
return redis.call('XADD', stream, '*', unpack(ARGV, 5))
