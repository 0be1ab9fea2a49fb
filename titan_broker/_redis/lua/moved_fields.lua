-- The fields of an entry moved to another stream (a new id): the move is
-- counted in field x, and the timeout (field ttl, counted from the id) is
-- cut by the time the entry already waited, so its deadline does not move.
-- Included by rescue.lua and handoff.lua (see scripting.py).
-- include: clock
local function moved_fields(f, id, now)
  local out, moves = {}, 0
  local born = tonumber(string.match(id, '^(%d+)')) or now
  for i = 1, #f, 2 do
    if f[i] == 'x' then
      moves = tonumber(f[i + 1]) or 0
    elseif f[i] == 'ttl' then
      out[#out + 1] = 'ttl'
      out[#out + 1] = tostring(math.max(0, (tonumber(f[i + 1]) or 0) - (now - born)))
    else
      out[#out + 1] = f[i]
      out[#out + 1] = f[i + 1]
    end
  end
  out[#out + 1] = 'x'
  out[#out + 1] = tostring(moves + 1)
  return out
end
