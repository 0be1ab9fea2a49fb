-- Answer calls and acknowledge their entries, each only if this worker still
-- owns it; several entries in one call (the settles a worker has ready
-- together: see batch.lua).
-- A worker that was cut off (its heartbeat lapsed) may have lost an entry to
-- another worker's claim: then it writes nothing for it (answers 0), so a
-- caller never gets two answers from two runs. Per entry, the reply goes
-- first: if it cannot be written (Redis out of memory) that entry's answer is
-- the error, it is not acknowledged and stays pending, still owned, for
-- another try. The acknowledged entries are deleted at the end, one XDEL per
-- stream.
-- Shared ARGV: group, consumer, reply ttl ms.
-- Per entry, KEYS: calls stream, [reply stream, or job hash];
--   ARGV: entry id, reply, [job status: done or failed].
-- Answers, per entry, 1 when answered, 0 when the entry is no longer this worker's.
-- include: settling
-- include: batch
local acked = {}
local function finish(keys, argv, shared)
  if not owns(keys[1], shared[1], argv[1], shared[2]) then return 0 end
  if keys[2] then answer(keys[2], argv[2], shared[3], argv[3]) end
  redis.call('XACK', keys[1], shared[1], argv[1])
  acked[keys[1]] = acked[keys[1]] or {}
  table.insert(acked[keys[1]], argv[1])
  return 1
end
local results = each_part(finish)
for stream, ids in pairs(acked) do redis.call('XDEL', stream, unpack(ids)) end
return results
