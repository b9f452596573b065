-- Extend an expiring token lock if it is still ours (gpu_tasks.control.lock.ExpiringLock.renew);
-- a lock that expired meanwhile is not taken back.
-- KEYS[1] the lock: a string holding its holder's token, expiring
-- ARGV[1] our token, ARGV[2] the lock's TTL in ms
-- Returns 1 if it was ours (and now lasts ARGV[2] ms more), 0 if not.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
