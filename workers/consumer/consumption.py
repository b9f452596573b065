"""What a GPU worker consumes, kept in step with its lease and the shard map.

The worker's main process (the one that fetches messages) runs :meth:`Consumption.tick`
every ``map_poll_s`` on Celery's event loop:

1. renew the GPU's lease; the same Lua call answers the shard map's epoch;
2. when the epoch moved, read the map and consume exactly the queues of the shards
   this GPU consumes (:attr:`gpu_tasks.control.shardmap.Shard.consumer`), by the batched
   fetch (:mod:`workers.consumer.fetch`), plus its own GPU queue, by Celery's consumer
   (no restart);
3. publish what this GPU now serves in its ownership table
   (:mod:`workers.consumer.ownership`), the one record of it, which the fence
   (:mod:`workers.consumer.fence`) and the pool child read.

Because the event loop renews the lease, a frozen or wedged main process stops
renewing it, and the GPU counts as gone after ``lease_ttl_s``. If the lease is lost
(another worker took the GPU over while this one was frozen or cut off from
Redis), the worker stops consuming and exits with :data:`EXIT_LEASE_LOST`.

**Redis outages.** A worker outlives a Redis that is down, restarted or hung, however
long: it keeps its pool child and so its device state, retries the connection every 2 s
at most (:class:`GpuConsumer`), and takes its lease again when Redis answers (it expired
meanwhile, but nobody else took it). What it had taken and could not acknowledge while
Redis was away (an acknowledgement lost with the connection, a request Celery dropped
with its closed channel) is still in the GPU's unacked keys; once Redis answers and the
lease is held again, every entry there that no request of this worker holds any more
goes back to the head of its queue (:meth:`Consumption.put_back_abandoned`), instead of
waiting for the next restart of the worker or for the visibility timeout.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import redis
from celery import bootsteps
from celery.worker import state as worker_state
from celery.worker.consumer import Consumer
from vine import promise

from gpu_tasks.control.fleet import FleetRegistry
from gpu_tasks.control.lease import EXIT_LEASE_LOST, Holder, LeaseStore, Renewal
from gpu_tasks.control.shardmap import ShardMapStore
from gpu_tasks.control.unacked import restore_unacked
from gpu_tasks.errors import ShardMapError
from gpu_tasks.protocol.routing import shard_name
from gpu_tasks.settings import Settings
from workers.consumer.device_stats import device_stats, registry_client
from workers.consumer.fence import Fence
from workers.consumer.fetch import BatchFetch
from workers.consumer.ownership import OwnershipTable

log = logging.getLogger(__name__)



class Consumption:
    """The main process's lease, shard-map epoch and consumed queues (see the module)."""

    def __init__(self, table: OwnershipTable, holder: Holder, settings: Settings,
                 client: redis.Redis, app: Any, fetch: BatchFetch | None = None) -> None:
        self.gpu = table.gpu
        self.fetch = fetch
        """Takes the shard queues' requests in batches (None: Celery's consumer does)."""
        self.holder = holder
        self.settings = settings
        self.table = table
        self.client = client
        self.leases = LeaseStore(client)
        self.maps = ShardMapStore(client)
        self.fence = Fence(table, app)
        self.epoch = -1
        """The map epoch the Celery consumer's queues were last brought to (what this GPU
        serves at it is in the table); a reconcile that fails is tried again next tick."""
        self._timer: Any = None
        self._redis_down_since: float | None = None
        self._started = False
        self._interrupted = False
        """Redis was away since the lease was last renewed (a failed renewal, or Celery
        restarted the consumer after losing its connection)."""
        self._registry: FleetRegistry | None = None
        self._swept_at = time.monotonic()

    # -- the lease -------------------------------------------------------------------

    def take_lease(self) -> None:
        """At boot, before Celery starts: take the GPU's lease or raise ``LeaseHeld``."""
        sent = time.monotonic()
        self._renewed(self.leases.take(self.gpu, self.holder, self.settings.lease_ttl_s), sent)

    def _renewed(self, renewal: Renewal, sent: float) -> None:
        # Redis started the lease's time to live after we sent the call: counting from
        # the send is safe, and a tenth of margin covers clocks running at other rates.
        self.table.hold_lease_until(sent + self.settings.lease_ttl_s * 0.9)

    def release_lease(self) -> None:
        self.table.hold_lease_until(0.0)
        try:
            self.leases.release(self.gpu, self.holder.token)
        except redis.RedisError as exc:
            log.warning("%s: could not release the lease (it expires by itself): %s",
                        self.gpu, exc)

    # -- bootstep hooks --------------------------------------------------------------

    def start(self, c: Consumer) -> None:
        c.gpu_fence = self.fence
        if self._started:
            self._interrupted = True  # Celery restarts its consumer after a lost connection
        self._started = True
        self.tick(c, force=True)
        self._timer = c.timer.call_repeatedly(self.settings.map_poll_s, self.tick, (c,))

    def stop(self, c: Consumer) -> None:
        if self._timer is not None:
            c.timer.cancel(self._timer)
            self._timer = None

    # -- inspect stats ---------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """This GPU's device and shards for ``inspect stats``
        (:mod:`workers.consumer.device_stats`)."""
        if self._registry is None:
            self._registry = FleetRegistry(registry_client(self.settings))
        stats = device_stats(self.gpu, self._registry, shards=len(self.table.served()),
                             epoch=self.epoch)
        if self.fetch is not None:
            stats["gpu_batches"] = self.fetch.stats.as_dict()
        return stats

    # -- every map_poll_s ------------------------------------------------------------

    def tick(self, c: Consumer, force: bool = False) -> None:
        sent = time.monotonic()
        try:
            renewal = self.leases.claim(self.gpu, self.holder, self.settings.lease_ttl_s,
                                        epoch=self.epoch, consuming=len(self.table.served()))
        except redis.RedisError as exc:
            self._interrupted = True
            if self._redis_down_since is None:
                self._redis_down_since = sent
                log.warning("%s: cannot renew the lease (%s); requests stop running in "
                            "%.1fs unless Redis answers", self.gpu, exc,
                            max(0.0, self.table.lease_until - sent))
            return
        if self._redis_down_since is not None:
            log.warning("%s: Redis answers again after %.1fs", self.gpu,
                        sent - self._redis_down_since)
            self._redis_down_since = None
        if not renewal.held:
            self._lost(c, renewal)
            return
        self._renewed(renewal, sent)
        if self.fetch is not None and self.fetch.reply_lost:
            self.fetch.reply_lost = False
            self._interrupted = True
        if self._interrupted or (self.fetch is not None
                                 and sent - self._swept_at >= SWEEP_EVERY_S):
            self._swept_at = sent
            self.put_back_abandoned()
        if force or renewal.map_epoch != self.epoch:
            self.reconcile(c, renewal.map_epoch)

    def put_back_abandoned(self) -> int:
        """After Redis was away: put back at the head of its queue every request this
        GPU's unacked keys hold that no request of this worker holds (see the module);
        returns how many. Called holding the lease, from the event loop, where no delivery
        is half made."""
        held = frozenset(
            tag for request in (*worker_state.requests.values(),
                                *worker_state.active_requests,
                                *worker_state.reserved_requests,
                                *worker_state.scheduled_requests)
            if isinstance(tag := getattr(request.message, "delivery_tag", None), str))
        if self.fetch is not None:
            held = held | self.fetch.held_tags()
        try:
            restored = restore_unacked(self.client, self.gpu, keep=held)
        except redis.RedisError as exc:
            log.warning("%s: cannot check for requests abandoned while Redis was away (%s); "
                        "trying again at the next tick", self.gpu, exc)
            return 0
        self._interrupted = False
        if restored:
            log.warning("%s: put back %d requests recorded as taken that this worker does not "
                        "hold (taken before Redis went away, or brought back by it), to run again "
                        "(a finished one is answered, not run)",
                        self.gpu, restored)
        return restored

    def reconcile(self, c: Consumer, map_epoch: int) -> None:
        """Consume exactly the queues of the shards this GPU consumes at the map's epoch."""
        if c.task_consumer is None:
            return  # between a lost connection and the consumer's restart
        shard_count, wanted, held, epoch = 0, [], [], -1
        versions: dict[int, int] = {}
        if map_epoch >= 0:
            try:
                shard_map = self.maps.load()
            except (ShardMapError, redis.RedisError) as exc:
                log.error("%s: cannot read the shard map (%s); consuming as before",
                          self.gpu, exc)
                return
            shard_count, epoch = shard_map.shard_count, shard_map.epoch
            wanted = shard_map.consumed_by(self.gpu)
            held = shard_map.held_by(self.gpu)
            versions = {i: shard_map.shards[i].version for i in held}
        shard_queues = [shard_name(i) for i in sorted(wanted)]
        current = {q.name for q in c.task_consumer.queues}
        before = set(self.fetch.queues) if self.fetch is not None else current - {self.gpu}
        # The batched fetch takes the shard queues; without it, Celery's consumer does.
        by_celery = [] if self.fetch is not None else shard_queues
        dropped = sorted(q for q in current if q != self.gpu and q not in by_celery)
        added = [q for q in by_celery if q not in current]
        # Stop serving dropped shards (fence and pool child) before cancelling their
        # queues: a message still in flight from one of them goes back where it came from.
        self.table.publish(epoch, wanted, held, versions, shard_count=shard_count)
        self._cancel(c, dropped)
        self._consume(c, [self.gpu] if self.gpu not in current else [])
        self._consume(c, added)
        if self.fetch is not None:
            self.fetch.consume(shard_queues)
        self.epoch = epoch
        gained, lost = set(shard_queues) - before, before - set(shard_queues)
        if gained or lost:
            log.warning("%s: shard map epoch %d: consuming %d shard queues (+%d, -%d)",
                        self.gpu, epoch, len(wanted), len(gained), len(lost))
        with contextlib.suppress(redis.RedisError):  # tell `status` now, not at the next tick
            self.leases.claim(self.gpu, self.holder, self.settings.lease_ttl_s,
                              epoch=epoch, consuming=len(wanted))

    def _consume(self, c: Consumer, names: list[str]) -> None:
        if not names:
            return
        queues, consumer = c.app.amqp.queues, c.task_consumer
        for name in names:
            if name in queues:
                queue = queues.select_add(queues[name])
            else:
                queue = queues.select_add(name, exchange=name, exchange_type="direct",
                                          routing_key=name)
            consumer.add_queue(queue)
        consumer.consume()

    def _cancel(self, c: Consumer, names: list[str]) -> None:
        for name in names:
            c.app.amqp.queues.deselect(name)
            c.task_consumer.cancel_by_queue(name)

    def _lost(self, c: Consumer, renewal: Renewal) -> None:
        log.critical("%s: lost the GPU's lease to another worker (token %s): no longer "
                     "consuming, shutting down", self.gpu, renewal.holder_token)
        self.table.hold_lease_until(0.0)
        self.table.publish(self.epoch, [])
        if self.fetch is not None:
            self.fetch.consume([])
        self._cancel(c, [q.name for q in c.task_consumer.queues])
        worker_state.should_stop = EXIT_LEASE_LOST


def bootstep(consumption: Consumption) -> type[bootsteps.StartStopStep]:
    """A consumer bootstep that runs ``consumption`` alongside Celery's task consumer."""

    class ShardConsumption(bootsteps.StartStopStep):  # type: ignore[misc]
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def start(self, c: Consumer) -> None:
            consumption.start(c)
            if consumption.fetch is not None:
                consumption.fetch.start(c)

        def stop(self, c: Consumer) -> None:
            if consumption.fetch is not None:
                consumption.fetch.stop(c)
            consumption.stop(c)

        def shutdown(self, c: Consumer) -> None:
            consumption.stop(c)
            if consumption.fetch is not None:
                consumption.fetch.shutdown(c)
            consumption.release_lease()

        def info(self, c: Consumer) -> dict[str, Any]:
            # Celery merges this into `inspect stats`, which Flower's worker page shows.
            return consumption.stats()

    return ShardConsumption


SWEEP_EVERY_S = 10.0
"""How often a GPU worker that takes in batches also puts back whatever its GPU's unacked
keys hold that it does not (a safety net: Redis restarted from an AOF that lost the last
second's writes can bring back entries a batch had already settled, and nothing else
would look at them before the worker's next start)."""

RECONNECT_INTERVALS_S = (0.5, 0.5, 2.0)
"""How a GPU worker retries a lost broker connection (first wait, added per try, longest).
Celery's consumer waits 2, 4, 6, ... up to 30 s between tries, so a worker came back up
to 16 s after a Redis that had been away for a minute (30 s after a longer outage); with
these it is back within 2 s of Redis."""
RECONNECT_LOG_EVERY_S = 30.0
"""While Redis stays away, a failed try is logged at most this often (the first at once)."""


class GpuConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, with every fetched message passing the fence first, and a lost
    broker connection retried every 2 s at most, without end."""

    gpu_fence: Fence | None = None

    def ensure_connected(self, conn: Any) -> Any:
        # Celery passes kombu's default intervals and gives up after
        # broker_connection_max_retries (100: about 47 minutes with them, 3 with ours),
        # ending the worker; a GPU worker keeps its device state and waits for Redis for as
        # long as it takes (a warm shutdown still stops it: Celery's callback checks).
        retry = conn.ensure_connection
        start, step, longest = RECONNECT_INTERVALS_S
        logged_at = [-RECONNECT_LOG_EVERY_S]

        def quieter(errback: Any) -> Any:
            def on_error(exc: Exception, interval: float) -> None:
                now = time.monotonic()
                if errback is not None and now - logged_at[0] >= RECONNECT_LOG_EVERY_S:
                    logged_at[0] = now
                    errback(exc, interval)
            return on_error

        def ensure_connection(errback: Any = None, max_retries: Any = None,
                              **options: Any) -> Any:
            options.update(interval_start=start, interval_step=step, interval_max=longest)
            return retry(quieter(errback), None, **options)

        conn.ensure_connection = ensure_connection
        try:
            return super().ensure_connected(conn)
        finally:
            del conn.ensure_connection  # the class's own again

    def create_task_handler(self, promise: Any = promise) -> Any:
        handle = super().create_task_handler(promise)
        fence = self.gpu_fence

        def on_task_received(message: Any) -> Any:
            if fence is None or fence.admit(message):
                return handle(message)
            return None

        return on_task_received


CONSUMER = f"{GpuConsumer.__module__}:{GpuConsumer.__qualname__}"
"""``worker_consumer`` of a GPU worker."""
