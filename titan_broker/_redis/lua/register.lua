-- Register a worker: its record, the worker and affinity sets, the service's
-- limits and shard count, in one step that first checks the count: a worker
-- whose shard count differs from the one the live workers registered is
-- refused, so callers, who read the count here, never send to a shard some
-- workers do not read. The count is absent for one shard (the unsharded
-- layout, unchanged).
-- KEYS: the worker's record, worker set, affinity set, config hash, idle mark
-- ARGV: shards, worker id, record TTL ms, record key prefix, max_backlog,
--       max_deliveries, then the record's field, value, ...
-- Returns 1; error TITANSHARDS <count> <live worker id>... when refused.
local shards, me = ARGV[1], ARGV[2]
local current = redis.call('HGET', KEYS[4], 'shards') or '1'
if current ~= shards then
  local live = {}
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    if id ~= me and redis.call('EXISTS', ARGV[4] .. id) == 1 then live[#live + 1] = id end
  end
  if #live > 0 then
    return redis.error_reply('TITANSHARDS ' .. current .. ' ' .. table.concat(live, ' '))
  end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SADD', KEYS[2], me)
redis.call('SADD', KEYS[3], me)
redis.call('HSET', KEYS[4], 'max_backlog', ARGV[5], 'max_deliveries', ARGV[6])
if shards == '1' then
  redis.call('HDEL', KEYS[4], 'shards')
else
  redis.call('HSET', KEYS[4], 'shards', shards)
end
redis.call('DEL', KEYS[5])
return 1
