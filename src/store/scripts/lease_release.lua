-- Give up a lease (KEYS[1]) if this holder (ARGV[1]) still holds it; returns 1 if it did.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
