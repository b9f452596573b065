-- Answer a dead-lettered request (gpu_tasks.control.deadletter.answer_dead_lettered): store
-- its FAILURE result unless a result is there already, and only then publish it, as
-- Celery's Redis result backend does: a waiting get() must never hear a failure for a
-- request whose result says otherwise.
-- KEYS[1] the request's result key (celery-task-meta-<task id>, also the channel)
-- ARGV[1] the result's JSON, ARGV[2] its TTL in seconds
-- Returns 0.
if redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2], 'NX') then
  redis.call('PUBLISH', KEYS[1], ARGV[1])
end
return 0
