-- Queueing one call: what submit.lua and submit_many.lua share. Included.
-- include: admission

-- `keys`, `argv`: as submit.lua's KEYS and ARGV.
local function submit(keys, argv)
  local stream = keys[1]
  if argv[2] ~= '' and redis.call('EXISTS', argv[2]) == 0 then stream = keys[2] end
  local full = backlog_full(argv[1], argv[3], stream)
  if full then return full end
  local deadline = tonumber(argv[4]) or 0
  if deadline > 0 then
    local now = redis_now_ms()
    if now >= deadline then
      return redis.error_reply('TITANLATE ' .. (now - deadline))
    end
    cut_ttl(argv, 5, deadline - now)
  end
  return redis.call('XADD', stream, '*', unpack(argv, 5))
end
