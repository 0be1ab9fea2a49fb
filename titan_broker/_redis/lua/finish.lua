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
-- Answers, per entry, 1 when answered, 0 when the entry is no longer this worker's
-- (or an earlier part of this batch answered it already).
-- include: settling
-- include: batch
local group, consumer = ARGV[2], ARGV[3]
local ranges, held, answered, expiring = {}, {}, {}, {}
each_part(function(keys, first)  -- first the ids of each stream, for one XPENDING per stream
  local id, r = ARGV[first], ranges[keys[1]]
  if not r then
    ranges[keys[1]] = {id, id}
  elseif id_before(id, r[1]) then
    r[1] = id
  elseif id_before(r[2], id) then
    r[2] = id
  end
  return 0
end)
for stream, r in pairs(ranges) do
  held[stream] = pending_for(stream, group, consumer, r[1], r[2])
  answered[stream] = {}
end
local results = each_part(function(keys, first, last, shared)
  local id, reply, job_status = ARGV[first], ARGV[first + 1], last > first + 1 and ARGV[first + 2] or nil
  if not held[keys[1]][id] then return 0 end
  if keys[2] then answer(keys[2], reply, shared[3], job_status, expiring) end
  table.insert(answered[keys[1]], id)
  -- Answered: no longer held for a second part of this batch for the same entry (one handed to this
  -- worker twice, by a failover to a replica that had not received its first delivery).
  held[keys[1]][id] = nil
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
