-- Read a cached result under the method's current generation.
-- KEYS: generation counter, entry prefix (the entry key is the prefix, the
-- generation, ':' and the digest: built here, in the same slot as the prefix)
-- ARGV: digest
-- Returns {generation, value or false}.
local gen = redis.call('GET', KEYS[1]) or '0'
return {gen, redis.call('GET', KEYS[2] .. gen .. ':' .. ARGV[1])}
