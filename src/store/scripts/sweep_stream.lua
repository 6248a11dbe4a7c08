-- One stream's sweep step: trim by receive time (entry ids), then delete up to a chunk
-- of the late-delivered entries (`crate::store::late_key`) whose fix time is past the
-- TTL. KEYS: fixes, late index. ARGV: min id ms, fix-time cutoff s (exclusive), chunk.
-- Returns {entries removed, late index members taken}.
local n = redis.call('XTRIM', KEYS[1], 'MINID', ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 0 then return {n, 0} end
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[2], 'LIMIT', 0, ARGV[3])
if #ids > 0 then
  n = n + redis.call('XDEL', KEYS[1], unpack(ids))
  redis.call('ZREM', KEYS[2], unpack(ids))
end
return {n, #ids}
