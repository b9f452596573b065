-- Take an expiring token lock if it is free or already ours, and set its expiry anew
-- (gpu_tasks.control.lock.ExpiringLock.claim).
-- KEYS[1] the lock: a string holding its holder's token, expiring
-- ARGV[1] our token, ARGV[2] the lock's TTL in ms
-- Returns 1 if the lock is ours now, 0 if another holder has it.
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
