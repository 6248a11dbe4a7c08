-- Remove the owner; what was received so far stays theirs (`owner_since` moves to now
-- for whoever comes next). KEYS: owner, owner_since. ARGV: now ms, expiry ms.
if redis.call('DEL', KEYS[1]) == 1 then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
end
return 1
