-- Read every queue's length and the age of its oldest request, in one call, noting each
-- queue's tail for the next snapshot (gpu_tasks.control.status.read_queues; the module says
-- how the age is measured).
-- KEYS[1] the tail notes hash (<queue> -> '<first seen, Redis ms> <tag>'), KEYS[2..] the queues
-- ARGV[1] the notes' TTL in ms
-- Returns "now_ms len_1 age_ms_1 len_2 age_ms_2 ..." (age -1: queue empty): one string,
-- because redis-py's reply parser costs ~2 us per element of a list reply.
-- The tag is found with a plain substring search (a pattern search costs ~25 us per
-- message, which over 1024 queues would be most of the snapshot), near the end first,
-- where kombu and gpu_tasks.protocol.envelope write it (properties come last), so a large
-- body is not scanned; JSON escapes quotes inside strings, so a "delivery_tag" inside a
-- header value cannot match. A message without one is known by its SHA-1 instead.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local key = '"delivery_tag"'
local function tag_of(message)
  local from = #message - 511
  if from < 1 then from = 1 end
  local at = string.find(message, key, from, true)
  if at == nil and from > 1 then at = string.find(message, key, 1, true) end
  if at ~= nil then
    local tag = string.match(message, '^%s*:%s*"([^"]+)"', at + #key)
    if tag then return tag end
  end
  return redis.sha1hex(message)
end
-- The notes are read once and written in batches: a redis.call costs about a
-- microsecond or two, one per queue would be most of the script.
local notes = {}
local flat = redis.call('HGETALL', KEYS[1])
for j = 1, #flat, 2 do notes[flat[j]] = flat[j + 1] end
local fresh, stale = {}, {}
local out = {now}
for i = 2, #KEYS do
  local queue = KEYS[i]
  local n = redis.call('LLEN', queue)
  local age = -1
  if n > 0 then
    local tail = redis.call('LINDEX', queue, -1)
    if tail then
      local tag = tag_of(tail)
      local seen = notes[queue]
      if seen then
        local space = string.find(seen, ' ', 1, true)
        if space and string.sub(seen, space + 1) == tag then
          age = now - tonumber(string.sub(seen, 1, space - 1))
        end
      end
      if age < 0 then
        fresh[#fresh + 1] = queue
        fresh[#fresh + 1] = now .. ' ' .. tag
        age = 0
      end
    end
  elseif notes[queue] then
    stale[#stale + 1] = queue
  end
  out[#out + 1] = n
  out[#out + 1] = age
end
-- In chunks: unpack is bounded by Lua's stack.
for j = 1, #fresh, 1000 do
  redis.call('HSET', KEYS[1], unpack(fresh, j, math.min(j + 999, #fresh)))
end
for j = 1, #stale, 1000 do
  redis.call('HDEL', KEYS[1], unpack(stale, j, math.min(j + 999, #stale)))
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return table.concat(out, ' ')
