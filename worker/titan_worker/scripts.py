"""The Lua scripts a worker runs; each makes one step atomic on the Redis side.

All keys a script touches belong to one service and share its hash tag, so
the scripts run unchanged on a Redis Cluster node.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

# Reply first, then acknowledge and delete: if the reply cannot be written
# (say Redis is out of memory) the script stops before XACK and the entry
# stays pending for another try.
# KEYS: calls stream, [reply stream]; ARGV: entry id, group, reply, reply ttl ms
FINISH = """
if KEYS[2] then
  redis.call('XADD', KEYS[2], '*', 'reply', ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
redis.call('XACK', KEYS[1], ARGV[2], ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
return 1
"""

# Keep the entries this worker is running from looking idle, so nobody claims
# them: XCLAIM ... JUSTID resets the idle time without counting a delivery.
# Only entries still owned by this consumer are touched (never take one back).
# KEYS: calls stream; ARGV: group, consumer, ids...
RENEW = """
local mine = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then mine[#mine + 1] = ARGV[i] end
end
local n = #mine
if n > 0 then
  mine[n + 1] = 'JUSTID'  -- after the ids: unpack() expands only as the last argument
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(mine))
end
return n
"""

# Claim entries idle longer than a heartbeat TTL (their worker stopped renewing
# them: it is dead) and return each with its delivery count, continuing the walk
# of the pending list from the cursor.
# KEYS: calls stream; ARGV: group, consumer, min idle ms, cursor, count
RECLAIM = """
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local entries, counts = {}, {}
for _, e in ipairs(r[2]) do
  if type(e) == 'table' and type(e[2]) == 'table' then
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
    entries[#entries + 1] = e
    counts[#counts + 1] = p[1] and p[1][4] or 0
  elseif type(e) == 'table' then
    redis.call('XACK', KEYS[1], ARGV[1], e[1])
  end
end
return {r[1], entries, counts}
"""

# Move an entry to the dead letters, answer its caller if it has one, then
# acknowledge and delete it.
# KEYS: calls stream, dead stream, [reply stream]
# ARGV: entry id, group, dead maxlen, reply, reply ttl ms, field, value, ...
# The reply goes first: if it fails, nothing else has happened.
DEAD_LETTER = """
if KEYS[3] then
  redis.call('XADD', KEYS[3], '*', 'reply', ARGV[4])
  redis.call('PEXPIRE', KEYS[3], ARGV[5])
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 6))
redis.call('XACK', KEYS[1], ARGV[2], ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
return 1
"""

# Remove a consumer only when its worker is gone and it holds nothing pending:
# XGROUP DELCONSUMER would throw its pending entries away.
# KEYS: calls stream, the consumer's worker record; ARGV: group, consumer
DELETE_CONSUMER = """
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #p > 0 then return -2 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""


# Move the calls of a dead worker's own stream (read or not) onto the shared
# stream, counting the move in field x, then drop that stream. Only once the
# worker's record is gone: a live worker keeps its calls.
# KEYS: its stream, the shared stream, its record, the affinity set; ARGV: worker id
RESCUE = """
if redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
local entries = redis.call('XRANGE', KEYS[1], '-', '+')
for _, e in ipairs(entries) do
  local f, out, moves = e[2], {}, 0
  for i = 1, #f, 2 do
    if f[i] == 'x' then moves = tonumber(f[i + 1]) or 0 else
      out[#out + 1] = f[i]
      out[#out + 1] = f[i + 1]
    end
  end
  out[#out + 1] = 'x'
  out[#out + 1] = tostring(moves + 1)
  redis.call('XADD', KEYS[2], '*', unpack(out))
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[4], ARGV[1])
return #entries
"""


# A token bucket shared by all workers; time from Redis, so clocks do not matter.
# KEYS: bucket hash; ARGV: rps, burst. Returns 0 when admitted, else ms to wait.
RATE_LIMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rps, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + (now - ts) * rps / 1000)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = math.ceil((1 - tokens) * 1000 / rps) end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rps) + 1000)
return wait
"""

# Read a cached result under the method's current generation.
# KEYS: generation counter; ARGV: entry prefix, digest. Returns {generation, value or false}.
CACHE_GET = """
local gen = redis.call('GET', KEYS[1]) or '0'
return {gen, redis.call('GET', ARGV[1] .. gen .. ':' .. ARGV[2])}
"""


@dataclass
class ScriptShas:
    """The SHA1 of each script once loaded into Redis."""

    finish: str = ""
    renew: str = ""
    reclaim: str = ""
    dead_letter: str = ""
    delete_consumer: str = ""
    rescue: str = ""
    rate_limit: str = ""
    cache_get: str = ""


SOURCES = {
    "finish": FINISH,
    "renew": RENEW,
    "reclaim": RECLAIM,
    "dead_letter": DEAD_LETTER,
    "delete_consumer": DELETE_CONSUMER,
    "rescue": RESCUE,
    "rate_limit": RATE_LIMIT,
    "cache_get": CACHE_GET,
}
assert {f.name for f in fields(ScriptShas)} == set(SOURCES)
