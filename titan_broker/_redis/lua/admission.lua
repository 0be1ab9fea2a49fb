-- Whether a service takes a new call: what submit.lua and enqueue.lua share. Included.

-- include: clock

-- An error reply when `stream` (and the delayed set `delayed`, when given)
-- hold the service's limit of calls already: the limit its workers publish
-- in `config` (read only: named in ARGV, not KEYS, because every KEY of an
-- EVALSHA counts as written for ACLs), else `default`. `seen`, when given,
-- keeps the limits and stream lengths read for the next calls of one batch
-- (whoever then adds to a stream counts it there: see submitting.lua).
local function backlog_full(config, default, stream, delayed, seen)
  local max = seen and seen[config]
  if not max then
    max = tonumber(redis.call('HGET', config, 'max_backlog') or default)
    if seen then seen[config] = max end
  end
  if max <= 0 then return nil end
  local waiting = seen and seen[stream]
  if not waiting then
    waiting = redis.call('XLEN', stream)
    if seen then seen[stream] = waiting end
  end
  if delayed then waiting = waiting + redis.call('ZCARD', delayed) end
  if waiting >= max then
    return redis.error_reply('TITANBACKLOG ' .. max)
  end
  return nil
end

-- The request fields in `argv` from index `first` on (to `last`, else to its
-- end), with the timeout (ttl) cut to `left` ms when it is longer: a call is
-- never queued to run after its caller stopped waiting.
local function cut_ttl(argv, first, left, last)
  for i = first, (last or #argv) - 1, 2 do
    if argv[i] == 'ttl' then
      if (tonumber(argv[i + 1]) or 0) > left then argv[i + 1] = tostring(left) end
      break
    end
  end
end
