-- Turn a GPU's live buffers into losses of their shards (gpu_tasks.control.bufferledger.retire):
-- all of them, or those of the shards listed from ARGV[5]. Each moves from the GPU's
-- ledger to its shard's lost hash, in one atomic step: a crash here loses nothing.
-- Retiring all of them also drops the note of why the GPU's pool child ended.
-- KEYS[1] the GPU's ledger hash (<entity_id>\x1f<name> -> JSON with generation, shard)
-- KEYS[2] why the GPU's last pool child ended (a string, may be absent)
-- ARGV[1] the reason ('': KEYS[2], else name the pool child's generation), ARGV[2] the
-- time (unix s), ARGV[3] the GPU, ARGV[4] the lost hashes' key without the shard index
-- (the lost hash of shard i is ARGV[4] .. i: which shards come up is known only here),
-- ARGV[5..] the shard indexes to retire (none: all)
-- Returns how many buffers were retired.
local live = redis.call('HGETALL', KEYS[1])
local why = ARGV[1]
if why == '' then why = redis.call('GET', KEYS[2]) or '' end
local only = {}
for i = 5, #ARGV do only[ARGV[i]] = true end
local retired = 0
for i = 1, #live, 2 do
  local line = cjson.decode(live[i + 1])
  local shard = tostring(line.shard)
  if #ARGV < 5 or only[shard] then
    local reason = why
    if reason == '' then
      reason = 'when the pool child of generation ' .. line.generation .. ' ended'
    end
    redis.call('HSET', ARGV[4] .. shard, live[i], cjson.encode(
      {generation = line.generation, why = reason, at = tonumber(ARGV[2]), gpu = ARGV[3]}))
    redis.call('HDEL', KEYS[1], live[i])
    retired = retired + 1
  end
end
if #ARGV < 5 then redis.call('DEL', KEYS[2]) end
return retired
