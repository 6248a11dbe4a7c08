-- Complete purge of one pseudonym: tail, history, metadata, late index; the cutoff only
-- ever rises. Returns the fixes deleted (the history's from its chunks' row counts, the
-- varint after a chunk's version and flags bytes; see `crate::store::chunk`).
-- KEYS: fixes, meta, tomb, late index, history, resend digests. ARGV: cutoff ms (receive
-- time, clock-skew margin included), tomb ttl ms, the last fix-time second taken at or
-- before the cutoff, a receive cutoff no write reaches.
local n = 0
if redis.call('EXISTS', KEYS[1]) == 1 then n = redis.call('XLEN', KEYS[1]) end
for _, c in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
  local v, scale, pos = 0, 1, 3
  while true do
    local b = string.byte(c, pos)
    if b == nil then break end
    v = v + (b % 128) * scale
    if b < 128 then break end
    pos, scale = pos + 1, scale * 128
  end
  n = n + v
end
redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[4], KEYS[5], KEYS[6])
local old = tonumber(redis.call('HGET', KEYS[3], 'all') or '-1')
if tonumber(ARGV[1]) > old then redis.call('HSET', KEYS[3], 'all', ARGV[1]) end
-- The device's cache too: every fix taken up to the cutoff's second is refused whenever
-- it arrives, as a range tombstone over fix times 0..ARGV[3] whose receive cutoff never
-- passes (so gateways that only know range tombstones refuse it as well). Only the
-- widest such range is kept.
local taken = tonumber(ARGV[3])
local widest = -1
for _, f in ipairs(redis.call('HKEYS', KEYS[3])) do
  local to = string.match(f, '^r:0:(%d+)$')
  if to and tonumber(to) < taken then
    redis.call('HDEL', KEYS[3], f)
  elseif to then
    widest = math.max(widest, tonumber(to))
  end
end
if widest < taken then redis.call('HSET', KEYS[3], 'r:0:' .. ARGV[3], ARGV[4]) end
if redis.call('PTTL', KEYS[3]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[3], ARGV[2]) end
return n
