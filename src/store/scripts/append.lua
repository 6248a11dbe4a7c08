-- Retention (trim, expiry) and the idempotent, purge-aware append, in one atomic step
-- per device and batch. A replay rewrites the batch id (a no-op write) so that it is
-- replicated again: a `WAIT` after a retry on a new connection then also covers the
-- first attempt's data. KEYS: fixes stream, meta hash, tombstone hash, late index, resend
-- digests. ARGV: batch id, ttl ms, trim cutoff ms, now ms, key version, upkeep ms,
-- late-after ms, then per job (frame): received ms, late flag (`1` if one of its fixes
-- was taken more than late-after ms before it was received), count of the words that
-- follow for it; per entry of the job: field count, resend digest (empty without a fix
-- time), field/value pairs (the fix time is field `t`, absent if unknown). Per job rather
-- than per entry, the received time is one argument for a whole CCE batch.
--
-- Resends (`crate::store::seen_key`, a set of integers): an entry whose digest the tail
-- already holds is the same fix sent again after its ACK was lost, and is not written a
-- second time (sealing drops the resends of fixes already sealed).
--
-- Late index (`crate::store::late_key`): the entry ids of fixes delivered late, by fix
-- time, so that the sweeper deletes them by fix time (trimming goes by receive time).
-- Only jobs flagged late are parsed for it.
--
-- Tombstone (written by purges, `crate::purge`): field `all` = cutoff ms of a complete
-- purge; fields `r:<from_s>:<to_s>` = cutoff ms of a range purge over fix times. An entry
-- received at or before a cutoff that covers it is not written: a purge is final even
-- for data that was already in flight when it ran. A complete purge also writes a range
-- `r:0:<cutoff s>` whose receive cutoff never passes: every fix taken at or before it is
-- refused whenever it is received (a device resending its cache after the purge must
-- not bring the purged history back). Without a tombstone the entries are
-- not parsed at all (most writes).
--
-- Upkeep (trim to the TTL, expiry of stream and meta) runs when the last one is more
-- than `upkeep` ms old, or the TTL changed: meta field `ue` holds the expiry it set,
-- now + ttl + upkeep, so no key expires before its newest fix's TTL, and the sweeper
-- trims exactly. `ue` is only advanced when the stream itself was upkept (0 otherwise).
-- Returns {entries written, entries a purge refused, resends not written again}, or -1
-- for a replay (nothing written).
local meta = redis.call('HMGET', KEYS[2], 'lb', 'ue', 'tt')
if meta[1] == ARGV[1] then
  redis.call('HSET', KEYS[2], 'lb', ARGV[1])
  return -1
end
local tomb = redis.call('HGETALL', KEYS[3])
local all = -1
local ranges = {}
for t = 1, #tomb, 2 do
  local f, v = tomb[t], tonumber(tomb[t + 1])
  if v == nil then return redis.error_reply('ERR bad tombstone value') end
  if f == 'all' then
    all = v
  else
    local a, b = string.match(f, '^r:(-?%d+):(-?%d+)$')
    if a == nil then return redis.error_reply('ERR bad tombstone field') end
    ranges[#ranges + 1] = {tonumber(a), tonumber(b), v}
  end
end
local checks = #tomb > 0
local late_after = tonumber(ARGV[7])
local i = 8
local written = 0
local purged = 0
local resent = 0
local late = 0
while i <= #ARGV do
  local recv = tonumber(ARGV[i])
  local latejob = ARGV[i + 1] == '1'
  local last = i + 2 + tonumber(ARGV[i + 2])
  i = i + 3
  while i <= last do
    local n = tonumber(ARGV[i])
    local digest = ARGV[i + 1]
    local keep = true
    local fixt = -1
    if latejob or (checks and #ranges > 0) then
      for j = i + 2, i + n, 2 do
        if ARGV[j] == 't' then fixt = tonumber(ARGV[j + 1]) break end
      end
    end
    if checks then
      keep = recv > all
      if keep then
        for _, r in ipairs(ranges) do
          if recv <= r[3] and fixt >= r[1] and fixt <= r[2] then keep = false break end
        end
      end
      if not keep then purged = purged + 1 end
    end
    if keep and digest ~= '' then
      keep = redis.call('SADD', KEYS[5], digest) == 1
      if not keep then resent = resent + 1 end
    end
    if keep then
      local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, i + 2, i + 1 + n))
      written = written + 1
      if latejob and fixt >= 0 and fixt * 1000 < recv - late_after then
        redis.call('ZADD', KEYS[4], fixt, id)
        late = late + 1
      end
    end
    i = i + 2 + n
  end
end
local now = tonumber(ARGV[4])
local ttl = tonumber(ARGV[2])
local up = tonumber(ARGV[6])
if late > 0 then redis.call('PEXPIRE', KEYS[4], ttl + up) end
local due = meta[2] == false or meta[3] ~= ARGV[2] or tonumber(meta[2]) < now + ttl
if due and written > 0 then
  redis.call('XTRIM', KEYS[1], 'MINID', '~', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ttl + up)
  redis.call('PEXPIRE', KEYS[5], ttl + up)
  redis.call('HSET', KEYS[2], 'lb', ARGV[1], 'ls', ARGV[4], 'kv', ARGV[5], 'tt', ARGV[2],
    'ue', string.format('%d', now + ttl + up))
elseif due then
  redis.call('HSET', KEYS[2], 'lb', ARGV[1], 'ls', ARGV[4], 'kv', ARGV[5], 'tt', ARGV[2], 'ue', 0)
else
  redis.call('HSET', KEYS[2], 'lb', ARGV[1], 'ls', ARGV[4], 'kv', ARGV[5])
end
if due then redis.call('PEXPIRE', KEYS[2], ttl + up) end
return {written, purged, resent}
