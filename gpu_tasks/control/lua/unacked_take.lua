-- Take what waits in a GPU's shard queues, and record it as taken by that GPU, in one
-- atomic step (gpu_tasks.protocol.unacked.take): nothing is ever off its queue without
-- being in the GPU's unacked hash, whatever happens to the reply.
-- Fairness: the queues with work are found from queue ARGV[1] on (in the order of KEYS,
-- wrapping), and served in rotation, one message each per round, so a flooded shard
-- cannot starve a trickling one; the next call starts where this one's first round
-- ended. A queue is popped at its tail (RPOP), where Celery's LPUSH puts the oldest.
-- Bounds: at most ARGV[2] messages, and no message that would take the total past
-- ARGV[3] bytes, except the first: a message larger than the bound is taken alone.
-- Each message is recorded as kombu records a delivery: HSET unacked <tag>
-- '[<message>, <ARGV[6]>, <queue>]' and ZADD unacked_index <ARGV[5] + n / 1e6> <tag>,
-- its tag ARGV[4] .. n (n = 1, 2, ...), so restoring in index order keeps queue order.
-- KEYS[1] the unacked hash, KEYS[2] the unacked index, KEYS[3..] the queues
-- ARGV[1] where to start (0-based, into the queues), ARGV[2] most messages, ARGV[3] most
-- bytes, ARGV[4] the tags' prefix, ARGV[5] now (seconds), ARGV[6] the exchange mark
-- Returns {next start, 1 if every queue was looked at else 0, then for each message
-- taken: its queue (1-based, into the queues), its tag, the message}. A call that takes
-- nothing has looked at every queue (read: a client tracking keys hears of the next push).
local nq = #KEYS - 2
if nq <= 0 then
  return {0, 1}
end
local start = tonumber(ARGV[1]) % nq
local most, most_bytes = tonumber(ARGV[2]), tonumber(ARGV[3])
local prefix, now, mark = ARGV[4], tonumber(ARGV[5]), cjson.encode(ARGV[6])

-- The queues with work, in rotation from start; no more than can be served in one round.
local ready = {}
local looked = 0
while looked < nq and #ready < most do
  local q = (start + looked) % nq
  if redis.call('LLEN', KEYS[q + 3]) > 0 then
    ready[#ready + 1] = q
  end
  looked = looked + 1
end

local out = {0, looked == nq and 1 or 0}
local taken, bytes, full = 0, 0, false
local next_start = (start + looked) % nq
local first_round = true
while #ready > 0 and not full do
  local still = {}
  for _, q in ipairs(ready) do
    if taken >= most then
      full = true
      break
    end
    local key = KEYS[q + 3]
    local message = redis.call('RPOP', key)
    if message then
      if taken > 0 and bytes + #message > most_bytes then
        redis.call('RPUSH', key, message) -- back at the head, where it was
        if first_round then
          next_start = q -- it goes first next time
        end
        full = true
        break
      end
      taken = taken + 1
      bytes = bytes + #message
      local tag = prefix .. taken
      redis.call('HSET', KEYS[1], tag,
                 '[' .. message .. ',' .. mark .. ',' .. cjson.encode(key) .. ']')
      redis.call('ZADD', KEYS[2], now + taken / 1e6, tag)
      out[#out + 1] = q + 1
      out[#out + 1] = tag
      out[#out + 1] = message
      if first_round then
        next_start = (q + 1) % nq
      end
      if bytes >= most_bytes then
        full = true
        break
      end
      if redis.call('LLEN', key) > 0 then
        still[#still + 1] = q
      end
    end
  end
  ready = still
  first_round = false
end
out[1] = next_start
return out
