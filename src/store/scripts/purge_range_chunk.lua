-- Delete entries with fix time in [from, to] among up to `count` entries from `start`
-- (an XRANGE bound: `<id>` inclusive or `(<id>` exclusive) to `end`.
-- KEYS: fixes. ARGV: start, count, from s, to s, end. Returns {last id seen or '', deleted}.
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[5], 'COUNT', ARGV[2])
local from, to = tonumber(ARGV[3]), tonumber(ARGV[4])
local doomed = {}
for _, e in ipairs(entries) do
  local f = e[2]
  for j = 1, #f, 2 do
    if f[j] == 't' then
      local t = tonumber(f[j + 1])
      if t and t >= from and t <= to then doomed[#doomed + 1] = e[1] end
      break
    end
  end
end
if #doomed > 0 then redis.call('XDEL', KEYS[1], unpack(doomed)) end
local last = ''
if #entries > 0 then last = entries[#entries][1] end
return {last, #doomed}
