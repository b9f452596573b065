-- Compare-and-set of one shard's entry (a handoff's steps), bumping the map's epoch.
-- KEYS[1] the shard map hash, KEYS[2] the map's meta hash
-- ARGV[1] the shard's index, ARGV[2] the JSON the entry must be now, ARGV[3] its new JSON
-- Returns the new epoch; error 'CONFLICT <the entry there now>' if it is not ARGV[2].
local field = 'shard-' .. ARGV[1]
local current = redis.call('HGET', KEYS[1], field)
if current ~= ARGV[2] then
  return redis.error_reply('CONFLICT ' .. tostring(current))
end
redis.call('HSET', KEYS[1], field, ARGV[3])
return redis.call('HINCRBY', KEYS[2], 'epoch', 1)
