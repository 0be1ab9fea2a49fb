-- Queueing one call: what submit.lua and submit_many.lua share. Included.
-- include: admission

-- What the calls of one script call read once: backlog limits and stream
-- lengths (see backlog_full), and Redis's clock.
local seen, now_ms = {}, nil

-- `keys`: as submit.lua's KEYS; ARGV[first] to ARGV[last]: as submit.lua's ARGV.
local function submit(keys, first, last)
  local stream = keys[1]
  local record = ARGV[first + 1]
  if record ~= '' and redis.call('EXISTS', record) == 0 then stream = keys[2] end
  local full = backlog_full(ARGV[first], ARGV[first + 2], stream, nil, seen)
  if full then return full end
  local deadline = tonumber(ARGV[first + 3]) or 0
  if deadline > 0 then
    now_ms = now_ms or redis_now_ms()
    local now = now_ms
    if now >= deadline then
      return redis.error_reply('TITANLATE ' .. (now - deadline))
    end
    cut_ttl(ARGV, first + 4, deadline - now, last)
  end
  local id = redis.call('XADD', stream, '*', unpack(ARGV, first + 4, last))
  if seen[stream] then seen[stream] = seen[stream] + 1 end
  return id
end
