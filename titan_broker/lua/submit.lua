-- Queue a call, unless the service's backlog is full.
-- Acknowledged entries are deleted, so a stream's length is its backlog
-- (unread plus in progress). The limit is the one the service's workers
-- publish, else the client's default. A call with an affinity key goes to
-- its worker's own stream while that worker lives (its record exists), else
-- to the shared stream.
-- KEYS: calls stream, service config hash, [worker record, shared stream]
-- ARGV: default limit, field, value, ...
-- Returns the new entry's id; error TITANBACKLOG <limit> when full.
local stream = KEYS[1]
if KEYS[3] and redis.call('EXISTS', KEYS[3]) == 0 then stream = KEYS[4] end
local max = tonumber(redis.call('HGET', KEYS[2], 'max_backlog') or ARGV[1])
if max > 0 and redis.call('XLEN', stream) >= max then
  return redis.error_reply('TITANBACKLOG ' .. max)
end
return redis.call('XADD', stream, '*', unpack(ARGV, 2))
