-- Answer calls and acknowledge their entries, each only if this worker still
-- owns it; several entries in one call (the settles a worker has ready
-- together: see batch.lua), all in one atomic step.
-- A worker that was cut off (its heartbeat lapsed) may have lost an entry to
-- another worker's claim: then it writes nothing for it (answers 0), so a
-- caller never gets two answers from two runs. Per entry, the reply goes
-- first: if it cannot be written (Redis out of memory) that entry's answer is
-- the error and it is not acknowledged: it stays pending, still owned, for
-- another try. The entries answered are acknowledged and deleted at the end
-- of the script (one XACK and one XDEL per stream), each reply stream's TTL
-- renewed once.
-- Shared ARGV: group, consumer, reply ttl ms.
-- Per entry, KEYS: calls stream, [reply stream, or job hash];
--   ARGV: entry id, reply, [job status: done or failed].
-- Answers, per entry, 1 when answered, 0 when the entry is no longer this worker's.
-- include: settling
-- include: batch
local group, consumer = ARGV[2], ARGV[3]
local ranges, held, answered, expiring = {}, {}, {}, {}
each_part(function(keys, argv)  -- first the ids of each stream, for one XPENDING per stream
  local r = ranges[keys[1]]
  if not r then
    ranges[keys[1]] = {argv[1], argv[1]}
  elseif id_before(argv[1], r[1]) then
    r[1] = argv[1]
  elseif id_before(r[2], argv[1]) then
    r[2] = argv[1]
  end
  return 0
end)
for stream, r in pairs(ranges) do
  held[stream] = pending_for(stream, group, consumer, r[1], r[2])
  answered[stream] = {}
end
local results = each_part(function(keys, argv, shared)
  if not held[keys[1]][argv[1]] then return 0 end
  if keys[2] then answer(keys[2], argv[2], shared[3], argv[3], expiring) end
  table.insert(answered[keys[1]], argv[1])
  return 1
end)
for stream, ids in pairs(answered) do
  if #ids > 0 then
    redis.call('XACK', stream, group, unpack(ids))
    redis.call('XDEL', stream, unpack(ids))
  end
end
for key, ttl_ms in pairs(expiring) do keep_expiring(key, ttl_ms) end
return results
