-- Drop an expiring token lock if it is ours (gpu_tasks.control.lock.ExpiringLock.release):
-- a holder that lost it never drops the next holder's.
-- KEYS[1] the lock: a string holding its holder's token, expiring
-- ARGV[1] our token
-- Returns 1 if it was ours (and is gone now), 0 if not.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
