-- Several runs of one script in one call (see scripting.py, Batch). Included.
-- KEYS: every part's keys in turn.
-- ARGV: the number of shared arguments S, the S shared arguments, then per
--       part: its number of keys, its number of arguments, its arguments.
-- `run(keys, first, last, shared)` answers one part, whose arguments are
-- ARGV[first] to ARGV[last] (read in place: copying them cost more than the
-- part's own XADD). A part that raises an error
-- (Redis out of memory, say) gets that error as its answer and nothing after
-- the failed command runs for it; the parts before it stand and the parts
-- after it run.
local function each_part(run)
  local shared_n = tonumber(ARGV[1])
  local shared = {unpack(ARGV, 2, 1 + shared_n)}
  local results, k, a = {}, 1, 2 + shared_n
  while a <= #ARGV do
    local nk, na = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
    local keys = {unpack(KEYS, k, k + nk - 1)}
    local first, last = a + 2, a + 1 + na
    k, a = k + nk, a + 2 + na
    local ok, result = pcall(run, keys, first, last, shared)
    if not ok then
      if type(result) == 'table' and result.err then
        result = redis.error_reply(result.err)
      else
        result = redis.error_reply(tostring(result))
      end
    end
    results[#results + 1] = result
  end
  return results
end
