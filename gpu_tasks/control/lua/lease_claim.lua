-- Take, renew or take over a GPU's lease (gpu_tasks.control.lease.LeaseStore.claim): taken
-- when it is free, already ours, or held by ARGV[3] (a holder known to be dead); then the
-- holder's fields are written, the expiry renewed, and the shard map's epoch reported.
-- KEYS[1] the GPU's lease hash, KEYS[2] the set of every GPU that has held a lease,
-- KEYS[3] the shard map's meta hash, KEYS[4] the lease-seen hash (<gpu> -> when it ends, ms)
-- ARGV[1] our token, ARGV[2] the TTL in ms, ARGV[3] the token we may replace ('' none),
-- ARGV[4] the GPU, ARGV[5..] the holder's field/value pairs
-- Returns {1, now_ms, map_epoch} (epoch -1: no map) or {0, the holder's token}.
local current = redis.call('HGET', KEYS[1], 'token')
if current and current ~= ARGV[1] and current ~= ARGV[3] then
  return {0, current}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if current ~= ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'acquired_ms', now)
end
redis.call('HSET', KEYS[1], 'token', ARGV[1], 'renewed_ms', now, 'ttl_ms', ARGV[2],
           unpack(ARGV, 5))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[4])
redis.call('HSET', KEYS[4], ARGV[4], now + tonumber(ARGV[2]))
return {1, now, tonumber(redis.call('HGET', KEYS[3], 'epoch') or '-1')}
