"""The GPU side of gpu-tasks: boot and pinning, the consumer, the pool child, devices.

Imported only by GPU workers (``gpu-tasks worker``); producers never import it.
:mod:`workers.boot` wires the parts; :mod:`workers.consumer` runs in the worker's main
process (transport, lease, shard consumption, fencing), :mod:`workers.child` in its one
pool child (the per-request path, the runtime, the task bodies), and
:mod:`workers.device` below it (backends found by name, the buffer store, kernels).
No module imports one that imports it back: boot imports the other three; the child
imports the device layer and the consumer's ownership table; the device layer imports
nothing above it but the buffer ledger's writer (:mod:`workers.device.ledger_writer`).

Never lost, never run twice
---------------------------
The guarantee holds per request; these are its mechanisms, and where each one lives
(this list is kept here so that none is added or removed unseen):

1. *Taken is recorded.* A shard queue's request is popped and recorded in the GPU's own
   unacked keys in one atomic step (:func:`gpu_tasks.control.unacked.take`, called by
   :mod:`workers.consumer.fetch`), and acknowledged in the transaction that stores its
   result (:mod:`workers.child.batch`); a take whose reply was lost is put back by the next
   lease tick (``Consumption.put_back_abandoned``). The GPU's own queue still goes through
   kombu, whose delivery is recorded after it arrives; one whose record failed as Redis
   went away is kept in the process and pushed back, marked redelivered, once Redis
   answers (:class:`workers.consumer.transport.GpuQoS` ``append``,
   ``GpuChannel._put_back_orphans``).
2. *One consumer per shard.* The fence (:func:`workers.consumer.fence.judge`) admits an
   entity request only with the GPU's lease held and its shard consumed here at the
   current epoch, when the request starts in the pool child (:mod:`workers.child.batch`;
   once one of a queue's requests in a batch went back, the rest of that queue's do too);
   the executor checks again before the body runs
   (:meth:`workers.child.runtime.DeviceRuntime.served_shard`), since the map may have moved
   since. Both read the one ownership record, :mod:`workers.consumer.ownership`. What is
   not admitted goes back, or on to its shard, in one transaction
   (``GpuQoS.settle``): never in two places.
3. *Put back at the head, marked redelivered*
   (:func:`gpu_tasks.control.unacked.mark_redelivered`): what a dead or cut-off worker had
   taken, by :func:`gpu_tasks.control.unacked.restore_unacked`, called by the same worker
   at boot (:func:`workers.boot.run_worker`), after a Redis outage for what it no longer
   holds (:meth:`workers.consumer.consumption.Consumption.put_back_abandoned`), or by
   failover (:mod:`gpu_tasks.control.failover`); a requeue by Celery
   (``GpuChannel._do_restore_message``).
4. *A finished request is answered, not run again.* A redelivered one whose result is
   stored is skipped (``Fence._finished_before``; in a batch, from the results the batch
   read in one MGET); a copy that reaches the pool
   child that completed it (fetched while the first ran, its result never stored, or sent
   twice by a producer) is answered from :mod:`workers.child.completed`
   (:func:`workers.child.executor.execute`); a body told ``redelivered`` may check what is
   done (``gpu_tasks.free`` answers ``already_gone``, :mod:`workers.child.handlers`).
5. *A request that ends its pool child is not retried forever.* The main process knows
   which request of a batch was running (:mod:`workers.consumer.progress`) and puts it back
   (``BatchFetch.recover``; Celery requeues one of the GPU queue,
   ``task_reject_on_worker_lost``); past ``GPU_TASKS_MAX_CHILD_DEATHS`` deaths it is
   dead-lettered instead (``BatchFetch._dead_letter_if_deadly``, ``GpuQoS.reject``, counted by
   :meth:`gpu_tasks.control.deadletter.DeadLetterStore.count_death`). A poisoned context
   ends the child only once the request's answer is stored
   (:meth:`workers.child.runtime.DeviceRuntime.after_task`), so it is not run again.
6. *Redis does not hand out a running request.* The visibility timeout is longer than
   the hard time limit (:mod:`gpu_tasks.settings`), the same wherever Celery reads it, and
   a delay that would reach past it is refused at submit time (:mod:`gpu_tasks.celeryapp`).
"""
