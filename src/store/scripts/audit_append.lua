-- Append one line to the audit stream, chained to the line before it, only if that line
-- is still the last: the caller computed this line's hash over the previous line's hash
-- (`h`) and its own fields; a line appended meanwhile by another gateway makes this a
-- no-op (returns 0), and the caller reads the new last line and hashes again.
-- KEYS: audit stream. ARGV: expected previous hash ('' when the stream has no chained
-- line yet), this line's hash, then its field/value pairs.
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local prev = ''
if #last > 0 then
  local f = last[1][2]
  for i = 1, #f, 2 do
    if f[i] == 'h' then prev = f[i + 1] end
  end
end
if prev ~= ARGV[1] then return 0 end
redis.call('XADD', KEYS[1], '*', 'prev', ARGV[1], 'h', ARGV[2], unpack(ARGV, 3))
return 1
