-- Set the owner. When it changes from another owner (or after an unassignment) the
-- device's history stays behind: `owner_since` moves to now. Assigning the same owner
-- again changes nothing. KEYS: owner, owner_since. ARGV: customer, now ms, expiry ms.
local prev = redis.call('GET', KEYS[1])
if prev ~= ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1])
  if prev or redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
  end
end
return 1
