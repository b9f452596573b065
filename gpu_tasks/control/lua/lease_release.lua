-- Give a GPU's lease up on a clean stop (LeaseStore.release), if it is ours, noting now
-- (Redis's clock) as when it ended.
-- KEYS[1] the GPU's lease hash, KEYS[2] the lease-seen hash (<gpu> -> when it ends, ms)
-- ARGV[1] our token, ARGV[2] the GPU
-- Returns 1 if the lease was ours (and is gone now), else 0.
if redis.call('HGET', KEYS[1], 'token') == ARGV[1] then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[2], ARGV[2], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  return redis.call('DEL', KEYS[1])
end
return 0
