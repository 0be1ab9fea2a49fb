-- Waking the workers for a delayed call due soon. Included (see scripting.py).
-- Workers look at the delayed set a few times a second and wait on its wake
-- list (the delayed set's key and ':wake', same slot) in between: a call due
-- sooner than their next look pushes a token there, and the worker that
-- pops it looks again at once. At most one token waits, for a second.
local WAKE_WITHIN_MS = 250  -- the workers' longest wait between two looks (scheduling.PROMOTE_EVERY)

local function wake_promoters(delayed_key, due_in_ms)
  if due_in_ms > WAKE_WITHIN_MS then return end
  local key = delayed_key .. ':wake'
  redis.call('LPUSH', key, '1')
  redis.call('LTRIM', key, 0, 0)
  redis.call('PEXPIRE', key, 1000)
end
