-- Send a chunk of a batch's lines exactly once (gpu_tasks.submit.batch): push each line's
-- message only the first time its bit in the batch's sent bitmap is set (SETBIT answers
-- the bit's old value), in the same atomic step, and only while this run holds the
-- batch's lock (gpu_tasks.control.lock), so a run that lost it cannot send.
-- KEYS[1] the sent bitmap, KEYS[2] the batch's lock, KEYS[3..] the chunk's shard queues
-- ARGV[1] the lock's token (this run's), ARGV[2] the bitmap's TTL in ms, then one
-- (line number, index in KEYS of its queue, message) triple per line
-- Returns how many lines were pushed; error 'LOCKLOST ...' (nothing sent) if the lock
-- is not this run's.
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return redis.error_reply("LOCKLOST the batch lock is held by another run")
end
local sent = 0
for i = 3, #ARGV, 3 do
  if redis.call('SETBIT', KEYS[1], ARGV[i], 1) == 0 then
    redis.call('LPUSH', KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2])
    sent = sent + 1
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return sent
