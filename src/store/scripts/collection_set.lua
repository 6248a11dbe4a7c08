-- Set a device's collection state (`crate::collection`) under one pseudonym: KEYS[1] the
-- state key; ARGV[1] `active` (deletes it), `paused` or `blocked`; ARGV[2] `1` when the
-- caller may change a blocked device (the operator). Returns 1 when set, 0 when the
-- device is blocked and the caller may not: checked and set in one step, so a block
-- landing meanwhile is never overwritten by a customer.
if ARGV[2] ~= '1' and redis.call('GET', KEYS[1]) == 'blocked' then return 0 end
if ARGV[1] == 'active' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1
