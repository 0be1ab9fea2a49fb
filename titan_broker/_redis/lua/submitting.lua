-- Queueing one call: what submit.lua and submit_many.lua share. Included.
-- include: admission

-- What the calls of one script call read once: backlog limits and stream
-- lengths (see backlog_full), and Redis's clock.
local seen, now_ms = {}, nil

-- `keys`, `argv`: as submit.lua's KEYS and ARGV.
local function submit(keys, argv)
  local stream = keys[1]
  if argv[2] ~= '' and redis.call('EXISTS', argv[2]) == 0 then stream = keys[2] end
  local full = backlog_full(argv[1], argv[3], stream, nil, seen)
  if full then return full end
  local deadline = tonumber(argv[4]) or 0
  if deadline > 0 then
    now_ms = now_ms or redis_now_ms()
    local now = now_ms
    if now >= deadline then
      return redis.error_reply('TITANLATE ' .. (now - deadline))
    end
    cut_ttl(argv, 5, deadline - now)
  end
  local id = redis.call('XADD', stream, '*', unpack(argv, 5))
  if seen[stream] then seen[stream] = seen[stream] + 1 end
  return id
end
