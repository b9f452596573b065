-- Store a new shard map (gpu_tasks.control.shardmap.ShardMapStore.create): every shard's
-- entry, the shard count, and an epoch one more than any map stored before.
-- KEYS[1] the shard map hash (field shard-<i> -> the shard's JSON entry)
-- KEYS[2] the map's meta hash (shard_count, epoch)
-- ARGV[1] '1' to replace an existing map, else '0'
-- ARGV[2..] each shard's JSON entry, shard 0 first
-- Returns the new epoch; error 'EXISTS ...' if a map exists and ARGV[1] is not '1'.
if ARGV[1] ~= '1' and redis.call('EXISTS', KEYS[2]) == 1 then
  return redis.error_reply('EXISTS shard map already exists')
end
local epoch = tonumber(redis.call('HGET', KEYS[2], 'epoch') or '0') + 1
redis.call('DEL', KEYS[1])
for i = 2, #ARGV do
  redis.call('HSET', KEYS[1], 'shard-' .. (i - 2), ARGV[i])
end
redis.call('HSET', KEYS[2], 'shard_count', #ARGV - 1, 'epoch', epoch)
return epoch
