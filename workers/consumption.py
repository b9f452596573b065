"""What a GPU worker consumes, kept in step with its lease and the shard map.

The worker's main process (the one that fetches messages) runs :meth:`Consumption.tick`
every ``map_poll_s`` on Celery's event loop:

1. renew the GPU's lease; the same Lua call answers the shard map's epoch;
2. when the epoch moved, read the map and consume exactly the queues of the shards
   this GPU consumes (:attr:`gpu_tasks.shardmap.Shard.consumer`) plus its own GPU
   queue, adding and cancelling queues on the running Celery consumer (no restart);
3. tell the fence (:mod:`workers.fence`) and the pool child
   (:mod:`workers.ownership`) what it now serves.

Because the event loop renews the lease, a frozen or wedged main process stops
renewing it, and the GPU counts as gone after ``lease_ttl_s``. If the lease is lost
(another worker took the GPU over while this one was frozen or cut off from
Redis), the worker stops consuming and exits with :data:`EXIT_LEASE_LOST`.
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

from gpu_tasks.errors import ShardMapError
from gpu_tasks.fleet import FleetRegistry
from gpu_tasks.lease import Holder, LeaseStore, Renewal
from gpu_tasks.routing import shard_name
from gpu_tasks.settings import Settings
from gpu_tasks.shardmap import ShardMapStore
from workers.fence import Fence, View
from workers.ownership import OwnershipTable
from workers.stats import device_stats, registry_client

log = logging.getLogger(__name__)

EXIT_LEASE_LOST = 3
"""Exit status of a worker whose GPU lease was taken over by another worker."""


class Consumption:
    """The main process's lease, shard-map epoch and consumed queues (see the module)."""

    def __init__(self, gpu: str, holder: Holder, settings: Settings, client: redis.Redis,
                 table: OwnershipTable, app: Any) -> None:
        self.gpu = gpu
        self.holder = holder
        self.settings = settings
        self.table = table
        self.leases = LeaseStore(client)
        self.maps = ShardMapStore(client)
        self.view = View(gpu)
        self.fence = Fence(self.view, app)
        self.epoch = -1
        self.owned: list[int] = []
        self._timer: Any = None
        self._redis_down_since: float | None = None
        self._registry: FleetRegistry | None = None

    # -- the lease -------------------------------------------------------------------

    def take_lease(self) -> None:
        """At boot, before Celery starts: take the GPU's lease or raise ``LeaseHeld``."""
        sent = time.monotonic()
        self._renewed(self.leases.take(self.gpu, self.holder, self.settings.lease_ttl_s), sent)

    def _renewed(self, renewal: Renewal, sent: float) -> None:
        # Redis started the lease's time to live after we sent the call: counting from
        # the send is safe, and a tenth of margin covers clocks running at other rates.
        until = sent + self.settings.lease_ttl_s * 0.9
        self.view.lease_until = until
        self.table.hold_lease_until(until)

    def release_lease(self) -> None:
        self.view.lease_until = 0.0
        self.table.hold_lease_until(0.0)
        try:
            self.leases.release(self.gpu, self.holder.token)
        except redis.RedisError as exc:
            log.warning("%s: could not release the lease (it expires by itself): %s",
                        self.gpu, exc)

    # -- bootstep hooks --------------------------------------------------------------

    def start(self, c: Consumer) -> None:
        c.gpu_fence = self.fence
        self.tick(c, force=True)
        self._timer = c.timer.call_repeatedly(self.settings.map_poll_s, self.tick, (c,))

    def stop(self, c: Consumer) -> None:
        if self._timer is not None:
            c.timer.cancel(self._timer)
            self._timer = None

    # -- inspect stats ---------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """This GPU's device and shards for ``inspect stats`` (:mod:`workers.stats`)."""
        if self._registry is None:
            self._registry = FleetRegistry(registry_client(self.settings))
        return device_stats(self.gpu, self._registry, shards=len(self.owned), epoch=self.epoch)

    # -- every map_poll_s ------------------------------------------------------------

    def tick(self, c: Consumer, force: bool = False) -> None:
        sent = time.monotonic()
        try:
            renewal = self.leases.claim(self.gpu, self.holder, self.settings.lease_ttl_s,
                                        epoch=self.epoch, consuming=len(self.owned))
        except redis.RedisError as exc:
            if self._redis_down_since is None:
                self._redis_down_since = sent
                log.warning("%s: cannot renew the lease (%s); requests stop running in "
                            "%.1fs unless Redis answers", self.gpu, exc,
                            max(0.0, self.view.lease_until - sent))
            return
        if self._redis_down_since is not None:
            log.warning("%s: Redis answers again after %.1fs", self.gpu,
                        sent - self._redis_down_since)
            self._redis_down_since = None
        if not renewal.held:
            self._lost(c, renewal)
            return
        self._renewed(renewal, sent)
        if force or renewal.map_epoch != self.epoch:
            self.reconcile(c, renewal.map_epoch)

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
        queues = {shard_name(i): i for i in wanted}
        current = {q.name for q in c.task_consumer.queues}
        dropped = sorted(q for q in current if q != self.gpu and q not in queues)
        added = sorted((q for q in queues if q not in current), key=queues.__getitem__)
        # Stop serving dropped shards (fence and pool child) before cancelling their
        # queues: a message still in flight from one of them goes back where it came from.
        self.view.consumed = queues
        self.view.shard_count = shard_count
        self.table.publish(epoch, wanted, held, versions)
        self._cancel(c, dropped)
        self._consume(c, [self.gpu] if self.gpu not in current else [])
        self._consume(c, added)
        self.epoch, self.owned = epoch, wanted
        if added or dropped:
            log.warning("%s: shard map epoch %d: consuming %d shard queues (+%d, -%d)",
                        self.gpu, epoch, len(wanted), len(added), len(dropped))
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
        self.view.lease_until = 0.0
        self.view.consumed = {}
        self.table.hold_lease_until(0.0)
        self.table.publish(self.epoch, [])
        self._cancel(c, [q.name for q in c.task_consumer.queues])
        self.owned = []
        worker_state.should_stop = EXIT_LEASE_LOST


def bootstep(consumption: Consumption) -> type[bootsteps.StartStopStep]:
    """A consumer bootstep that runs ``consumption`` alongside Celery's task consumer."""

    class ShardConsumption(bootsteps.StartStopStep):  # type: ignore[misc]
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def start(self, c: Consumer) -> None:
            consumption.start(c)

        def stop(self, c: Consumer) -> None:
            consumption.stop(c)

        def shutdown(self, c: Consumer) -> None:
            consumption.stop(c)
            consumption.release_lease()

        def info(self, c: Consumer) -> dict[str, Any]:
            # Celery merges this into `inspect stats`, which Flower's worker page shows.
            return consumption.stats()

    return ShardConsumption


class GpuConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, with every fetched message passing the fence first."""

    gpu_fence: Fence | None = None

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
