-- Add messages of a streamed result's items to the caller's reply stream, keeping
-- the stream's TTL: a caller that left must not leave a stream that never expires.
-- KEYS: reply stream; ARGV: reply ttl ms, then one or more messages
for i = 2, #ARGV do
  redis.call('XADD', KEYS[1], '*', 'reply', ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return #ARGV - 1
