-- Delete a stream once it is empty, atomically: an entry appended meanwhile keeps it.
-- Used to retire a key of an older layout that another gateway may still append to.
-- KEYS: stream. Returns 1 if it was deleted, 0 if it still holds entries (or is gone).
if redis.call('XLEN', KEYS[1]) == 0 then return redis.call('DEL', KEYS[1]) end return 0
