-- Move rows between a device's live tail and its history chunks, atomically, only if
-- everything it was computed from is still there: a purge, the sweeper or another
-- gateway that changed any of it in the meantime makes it a no-op (returns 0), and the
-- caller reads again. Sealing (tail entries into chunks) and rewriting chunks (purge
-- inside a chunk, retention across a chunk boundary) both go through here.
-- KEYS: tail stream, history set, late index, resend digests.
-- ARGV: prefix, after (both '' unless the tail entries are the tail's oldest, all of
-- them: see below); k, k tail entry ids to delete (ascending); g, g resend digests of
-- those entries to forget; m, m chunks to remove; then (score, chunk) pairs to add.
-- Returns 1 when applied, 0 on a conflict.
--
-- Prefix mode (prefix = '1', after = the id after the last entry): the entries were read
-- as the tail's first k. If the stream's first entry is still the first of them and no
-- entry at or after it was ever removed (XINFO: max-deleted-entry-id below it), none of
-- them has gone: appends only come after them, and a stream deleted and made again
-- starts with newer ids. Then `XTRIM MINID after` removes exactly them, far cheaper than
-- a check and an `XDEL` per id.
local function id_before(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if am == nil or bm == nil then return false end
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
local k = tonumber(ARGV[3])
local prefix = ARGV[1] ~= ''
if k > 0 and prefix then
  if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  local maxdel, first
  for i = 1, #info, 2 do
    local f = info[i]
    if f == 'max-deleted-entry-id' then maxdel = info[i + 1]
    elseif f == 'first-entry' then first = info[i + 1] and info[i + 1][1]
    end
  end
  if maxdel == nil or first ~= ARGV[4] or not id_before(maxdel, ARGV[4]) then return 0 end
elseif k > 0 then
  -- One range read over the entries (ids ascending) instead of a lookup per id.
  local present = {}
  for _, e in ipairs(redis.call('XRANGE', KEYS[1], ARGV[4], ARGV[k + 3])) do
    present[e[1]] = true
  end
  for i = 4, k + 3 do
    if not present[ARGV[i]] then return 0 end
  end
end
local g = tonumber(ARGV[k + 4])
local m = tonumber(ARGV[k + g + 5])
local o = k + g + 6
for i = o, o + m - 1 do
  if not redis.call('ZSCORE', KEYS[2], ARGV[i]) then return 0 end
end
if k > 0 then
  if prefix then
    redis.call('XTRIM', KEYS[1], 'MINID', ARGV[2])
  else
    redis.call('XDEL', KEYS[1], unpack(ARGV, 4, k + 3))
  end
  if redis.call('EXISTS', KEYS[3]) == 1 then
    redis.call('ZREM', KEYS[3], unpack(ARGV, 4, k + 3))
  end
end
if g > 0 then redis.call('SREM', KEYS[4], unpack(ARGV, k + 5, k + g + 4)) end
if m > 0 then redis.call('ZREM', KEYS[2], unpack(ARGV, o, o + m - 1)) end
for i = o + m, #ARGV, 2 do
  redis.call('ZADD', KEYS[2], ARGV[i], ARGV[i + 1])
end
-- The history lives at least as long as the tail it came from would have (the append
-- script keeps the tail's expiry beyond its newest fix's retention).
local pt = redis.call('PTTL', KEYS[1])
if pt > 0 and redis.call('EXISTS', KEYS[2]) == 1 then
  local ph = redis.call('PTTL', KEYS[2])
  if ph == -1 or ph < pt then redis.call('PEXPIRE', KEYS[2], pt) end
end
return 1
