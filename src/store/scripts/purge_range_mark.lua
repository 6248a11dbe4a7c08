-- Record a range cutoff; it only ever rises (a retried older request of the same range
-- must not reopen it for fixes that a newer, completed purge already shut out).
-- KEYS: tomb. ARGV: field, cutoff ms, tomb ttl ms.
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '-1')
if tonumber(ARGV[2]) > old then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1
