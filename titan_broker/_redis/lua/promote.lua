-- Move the delayed calls that are due onto the service's stream, the most
-- overdue first. Every worker of the service runs this a few times a second;
-- ZREM and XADD happen in one script, so whichever gets there first moves a
-- call and none starts twice. A call's ttl counts from its due time and is
-- cut by how late it moves; a job notes its new entry (its hash's key is
-- built from the prefix and the job token, in the same slot).
-- A member with the field '@' (a user name) goes to that registered caller
-- user's stream, the calls stream's key and '@<user>' (same slot), without
-- the field, when that stream exists (its workers made its group); else to
-- the calls stream.
-- A member that cannot be read (not a msgpack map of strings: written by
-- something else) goes to the dead letters rather than being lost.
-- A call (not a job) whose caller gave up meanwhile (its gone mark,
-- ``<gone prefix><call id>``, exists) is dropped.
-- KEYS: delayed set, calls stream, dead stream
-- ARGV: at most this many, job key prefix, dead maxlen, gone mark prefix
-- Returns {calls moved, ms until the next due call or -1 when none waits}.
-- include: clock
local now = redis_now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[1]))
local moved = 0
for i = 1, #due, 2 do
  local member, at = due[i], tonumber(due[i + 1])
  redis.call('ZREM', KEYS[1], member)
  local ok, f = pcall(cmsgpack.unpack, member)
  local flat, stream = {}, KEYS[2]
  if ok and type(f) == 'table' then
    for k, v in pairs(f) do
      if k == '@' then
        -- a registered caller user's call: back onto that user's stream (its name as in ACL rules)
        if type(v) == 'string' and #v <= 64 and string.match(v, '^[%w_%-]+$')
           and redis.call('EXISTS', KEYS[2] .. '@' .. v) == 1 then
          stream = KEYS[2] .. '@' .. v
        end
      elseif type(k) == 'string' and type(v) == 'string' then
        if k == 'ttl' then v = string.format('%d', math.max(0, (tonumber(v) or 0) - (now - at))) end
        flat[#flat + 1] = k
        flat[#flat + 1] = v
      end
    end
  end
  local gone = #flat > 0 and type(f['j']) ~= 'string' and type(f['id']) == 'string'
               and redis.call('EXISTS', ARGV[4] .. f['id']) == 1
  if gone then
    -- its caller gave up: nothing to run
  elseif #flat == 0 then
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'entry', member, 'reason',
               'a delayed call that cannot be read (not a msgpack map of strings)',
               'deliveries', 0, 'worker', '', 'source_id', '', 'at', now)
  else
    local id = redis.call('XADD', stream, '*', unpack(flat))
    moved = moved + 1
    if type(f['j']) == 'string' then
      local job = ARGV[2] .. f['j']
      if redis.call('EXISTS', job) == 1 then
        redis.call('HSET', job, 'entry', id, 'queued', now)
        redis.call('HDEL', job, 'delayed')
      end
    end
  end
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if nxt[2] then return {moved, math.max(0, tonumber(nxt[2]) - now)} end
return {moved, -1}
