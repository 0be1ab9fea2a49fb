-- Add one item of a streamed result to the caller's reply stream, keeping
-- the stream's TTL: a caller that left must not leave a stream that never expires.
-- KEYS: reply stream; ARGV: item, reply ttl ms
-- include: settling
add_reply(KEYS[1], ARGV[1], ARGV[2])
return 1
