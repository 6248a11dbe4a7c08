-- Record a finished rewrite of Redis' files (`crate::disk`) that started at epoch ARGV[1]
-- and ended at ARGV[2] (ms), unless a later one is already recorded. KEYS: the disk hash.
local done = tonumber(redis.call('HGET', KEYS[1], 'done_epoch') or '0')
if done >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'done_epoch', ARGV[1], 'done_ms', ARGV[2])
return 1
