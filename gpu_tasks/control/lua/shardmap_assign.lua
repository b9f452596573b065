-- Give shards new owners and bump the map's epoch (ShardMapStore.assign).
-- KEYS[1] the shard map hash, KEYS[2] the map's meta hash
-- ARGV one (shard index, the shard's new JSON entry) pair per shard
-- Returns the new epoch; error 'NOMAP ...' without a map, or 'RANGE ...' at the first
-- index outside 0..S-1 (the pairs before it are written then, and the epoch not bumped).
local count = tonumber(redis.call('HGET', KEYS[2], 'shard_count') or '-1')
if count < 0 then return redis.error_reply('NOMAP no shard map') end
for i = 1, #ARGV, 2 do
  local index = tonumber(ARGV[i])
  if index == nil or index < 0 or index >= count then
    return redis.error_reply('RANGE shard index ' .. ARGV[i] .. ' outside 0..' .. (count - 1))
  end
  redis.call('HSET', KEYS[1], 'shard-' .. ARGV[i], ARGV[i + 1])
end
return redis.call('HINCRBY', KEYS[2], 'epoch', 1)
