-- Redis's clock in ms: deadlines and due times are in it, so no host's clock matters. Included.
local function redis_now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
