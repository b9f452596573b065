"""The coordinator: one long-running process that keeps the fleet whole.

Every ``interval_s`` (``gpu-tasks coordinator``, a systemd unit in ``ops/``) it:

1. holds the coordinator lease (``gpu-tasks:coordinator``, expiring): of several
   coordinators one acts and the others stand by, so two never act at once;
2. fails over every GPU whose lease has been expired for ``failover_after_s``, then
   resumes the handoffs it was part of (:func:`gpu_tasks.control.actions.fail_over_and_resume`,
   as ``gpu-tasks shards failover`` does), counting only while Redis answered: after Redis
   was away (down, restarted, hung) every lease has run out, because no worker could renew
   it, so a GPU is failed over only if its worker has not taken its lease again
   ``failover_after_s`` after Redis answers this coordinator again (workers take it again
   within seconds);
3. finishes or rolls back the other handoffs that nobody drives any more (their driver
   died), then, with ``auto_rebalance`` and when a live, undrained GPU owns no shard (one
   joined, or came back empty after a failover), rebalances, at most ``max_moves``
   handoffs a round (:func:`gpu_tasks.control.actions.finish_and_rebalance`, as
   ``gpu-tasks shards rebalance`` does).

:meth:`Coordinator.tick` does one round and says what it did, for the CLI, a test, or
a log.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis

from gpu_tasks.control import handoff as handoffs
from gpu_tasks.control.actions import Listener, fail_over_and_resume, finish_and_rebalance
from gpu_tasks.control.lease import LeaseStore
from gpu_tasks.control.lock import ExpiringLock
from gpu_tasks.control.rebalance import Plan, plan_from_redis
from gpu_tasks.control.shardmap import ShardMapStore
from gpu_tasks.errors import GpuTasksError
from gpu_tasks.keys import COORDINATOR_KEY

log = logging.getLogger(__name__)


@dataclass
class Tick:
    """What one round did."""

    acting: bool
    """Whether this coordinator holds the lease (False: on standby)."""
    failed_over: list[dict[str, Any]] = field(default_factory=list)
    handoffs: list[dict[str, Any]] = field(default_factory=list)
    rebalanced: bool = False
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"acting": self.acting, "failed_over": self.failed_over,
                "handoffs": self.handoffs, "rebalanced": self.rebalanced,
                "errors": self.errors}


class _Round(Listener):
    """How a round hears of its handoffs: it renews the coordinator lease while they run,
    and says onto which GPUs it rebalances."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.joined: list[str] = []
        """Live, undrained GPUs that own no shard (set where the round plans)."""

    def polled(self) -> None:
        self.coordinator.holds_lease()

    def rebalancing(self, plan: Plan) -> None:
        log.warning("rebalancing onto %s: %d moves", ", ".join(self.joined), len(plan.moves))


class Coordinator:
    def __init__(self, client: redis.Redis, app: Any, *, failover_after_s: float = 30.0,
                 auto_rebalance: bool = False, max_moves: int = 8, parallel: int = 4,
                 interval_s: float = 1.0, lease_ttl_s: float = 15.0,
                 pause: tuple[str, float] | None = None) -> None:
        self.client = client
        self.app = app
        self.failover_after_s = failover_after_s
        self.auto_rebalance = auto_rebalance
        self.max_moves = max_moves
        self.parallel = parallel
        self.interval_s = interval_s
        self.lease_ttl_s = lease_ttl_s
        self.pause = pause
        self.token = f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
        self.lock = ExpiringLock(client, COORDINATOR_KEY, self.token, lease_ttl_s)
        """The coordinator lease: of several coordinators, the one holding it acts."""
        self.maps = ShardMapStore(client)
        self.leases = LeaseStore(client)
        self._redis_failed = False
        self._redis_back_at: float | None = None
        """When Redis answered again after this coordinator last saw it fail (monotonic)."""

    def redis_failed(self) -> None:
        """Tell the coordinator that a round failed on Redis (:meth:`run` does): until
        Redis has answered again for ``failover_after_s``, no GPU is failed over."""
        self._redis_failed = True

    def _gone_for_s(self, gpu: str) -> float | None:
        """How long ``gpu``'s lease has been expired while Redis answered."""
        gone = self.leases.gone_for_s(gpu)
        if gone is not None and self._redis_back_at is not None:
            gone = min(gone, time.monotonic() - self._redis_back_at)
        return gone

    def holds_lease(self) -> bool:
        """Take or renew the coordinator lease; False while another coordinator holds it."""
        return self.lock.claim()

    def release(self) -> None:
        """Give the coordinator lease up, if this coordinator holds it."""
        self.lock.release()

    def tick(self) -> Tick:
        """One round (see the module docstring)."""
        if not self.holds_lease():
            return Tick(acting=False)
        if self._redis_failed:
            self._redis_failed = False
            self._redis_back_at = time.monotonic()
            log.warning("coordinator: Redis answers again; it fails over the GPUs whose "
                        "workers have not taken their lease again %gs from now",
                        self.failover_after_s)
        tick = Tick(acting=True)
        try:
            shard_map = self.maps.load()
        except GpuTasksError as exc:
            tick.errors.append(str(exc))
            return tick
        live = {g for g, lease in self.leases.all().items() if lease is not None}
        orphans = [i for i, s in shard_map.moving().items()
                   if not handoffs.driven(self.client, s.handoff)]
        gpus = {g for s in shard_map.shards for g in (s.owner, s.target) if g}
        listener = _Round(self)
        for gpu in sorted(gpus - live):
            gone = self._gone_for_s(gpu)
            if gone is None or gone < self.failover_after_s:
                continue
            try:
                failed = fail_over_and_resume(self.client, self._app, gpu,
                                              parallel=self.parallel, pause=self.pause,
                                              listener=listener)
            except GpuTasksError as exc:
                tick.errors.append(str(exc))
                continue
            tick.failed_over.append(failed.report.as_dict())
            tick.handoffs += [o.as_dict() for o in failed.outcomes]
            orphans = [i for i in orphans if i not in failed.report.resumed]

        def onto_joined() -> Plan | None:
            """A plan only while nothing moves and a live, undrained GPU owns no shard."""
            shard_map = self.maps.load()
            if shard_map.moving():
                return None
            owners = {s.owner for s in shard_map.shards}
            listener.joined = sorted(live - owners - self.maps.drained())
            if not listener.joined:
                return None
            return plan_from_redis(self.client, max_moves=self.max_moves)

        done = finish_and_rebalance(self.client, self._app, sorted(orphans),
                                    onto_joined if self.auto_rebalance else None,
                                    parallel=self.parallel, pause=self.pause,
                                    listener=listener)
        tick.handoffs += [o.as_dict() for o in done.outcomes]
        tick.rebalanced = bool(done.plan is not None and done.plan.moves)
        for event in tick.failed_over:
            log.warning("failed over %s", event)
        for event in tick.handoffs:
            if event["status"] != "moved":
                log.warning("%s: %s %s", event["shard"], event["status"], event["message"])
        return tick

    def _app(self) -> Any:
        return self.app

    def run(self, stop: threading.Event) -> None:
        """Tick until ``stop`` is set; then give the lease up."""
        log.warning("coordinator %s: failover after %.0fs%s", self.token,
                    self.failover_after_s, ", auto-rebalance" if self.auto_rebalance else "")
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    self.tick()
                except redis.RedisError as exc:
                    if not self._redis_failed:
                        log.warning("coordinator: Redis: %s; trying again every %gs, and "
                                    "failing no GPU over until %gs after it answers", exc,
                                    self.interval_s, self.failover_after_s)
                    self.redis_failed()
                stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))
        finally:
            with contextlib.suppress(redis.RedisError):
                self.release()
