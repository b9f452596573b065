"""The fleet's compound actions, each written once for everyone who takes it.

- :func:`finish_and_rebalance`: finish (or roll back) the handoffs left unfinished, then
  plan a rebalance on the map they leave and hand the planned shards off.
  ``gpu-tasks shards rebalance`` and ``gpu-tasks drain`` (:func:`rebalance`,
  :func:`drain`) take it over every unfinished handoff; the coordinator's round over
  those nobody drives, planning only when a GPU joined.
- :func:`fail_over_and_resume`: give a dead GPU's shards to live GPUs, then finish the
  handoffs it was part of. ``gpu-tasks shards failover`` takes it for one GPU, the
  coordinator's round for each GPU whose lease ran out long enough ago.
- :func:`move`: one shard's handoff (``gpu-tasks shards move``).

Each returns what happened: the CLI renders it, the coordinator logs it. A
:class:`Listener` hears of it as it happens (the CLI draws a progress bar; the coordinator
renews its lease while handoffs run).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from gpu_tasks.control import handoff as handoffs
from gpu_tasks.control.failover import Failover, fail_over
from gpu_tasks.control.handoff import Outcome
from gpu_tasks.control.rebalance import Plan, plan_from_redis
from gpu_tasks.control.shardmap import ShardMapStore, check_gpu

AppSource = Callable[[], Any]
"""Returns the Celery app that sends the handoffs' tasks and reads their results. Called
only when there is a handoff to drive: configuring the app costs a CLI command that has
nothing to move a noticeable part of a second."""

SETTLED = ("moved", "nothing to do")
"""Outcomes that leave a shard where it was asked to be."""


class Listener:
    """What a caller hears while an action runs; each method does nothing here."""

    def failed_over(self, report: Failover) -> None:
        """A GPU's shards have live owners now; its handoffs are resumed next."""

    def rebalancing(self, plan: Plan) -> None:
        """The plan's moves are about to start (there is at least one)."""

    def handing_off(self, count: int) -> None:
        """``count`` more handoffs are about to be driven."""

    def handed_off(self, outcome: Outcome) -> None:
        """One handoff has ended."""

    def polled(self) -> None:
        """Between two polls of the handoffs in flight."""


def succeeded(outcomes: Iterable[Outcome]) -> bool:
    """Whether every handoff left its shard where it was asked to be."""
    return all(o.status in SETTLED for o in outcomes)


@dataclass
class Rebalanced:
    """What :func:`finish_and_rebalance` did (or, for a dry run, would do)."""

    unfinished: list[int]
    """Shards whose handoff was found unfinished: finished or rolled back first."""
    plan: Plan | None
    """The plan, made on the map the unfinished handoffs left (None: no rebalance)."""
    outcomes: list[Outcome] = field(default_factory=list)
    """The unfinished handoffs' outcomes, then the plan's."""

    @property
    def ok(self) -> bool:
        return succeeded(self.outcomes)


@dataclass
class FailedOver:
    """What :func:`fail_over_and_resume` did."""

    report: Failover
    outcomes: list[Outcome] = field(default_factory=list)
    """The outcomes of the handoffs it was part of, resumed."""

    @property
    def ok(self) -> bool:
        return succeeded(self.outcomes)


def drive(client: redis.Redis, app: AppSource, moves: Sequence[tuple[int, str | None]], *,
          parallel: int = 4, pause: tuple[str, float] | None = None,
          listener: Listener | None = None) -> list[Outcome]:
    """Hand off each ``(shard, target)`` (target None: resume the shard's recorded
    handoff), ``parallel`` at a time; their outcomes. Every target is checked before any
    handoff starts."""
    if not moves:
        return []
    listener = listener or Listener()
    celery_app = app()
    work = [handoffs.Handoff(index, target, client, celery_app, pause=pause)
            for index, target in moves]
    listener.handing_off(len(work))
    return handoffs.drive_all(work, parallel, on_done=listener.handed_off, on_poll=listener.polled)


def unfinished(client: redis.Redis) -> list[int]:
    """Shards in the middle of a handoff, driven or not."""
    return sorted(ShardMapStore(client).load().moving())


def finish_and_rebalance(client: redis.Redis, app: AppSource, unfinished: Sequence[int],
                         planner: Callable[[], Plan | None] | None, *, parallel: int = 4,
                         pause: tuple[str, float] | None = None,
                         listener: Listener | None = None) -> Rebalanced:
    """Finish or roll back the handoffs of ``unfinished`` shards, then hand off what
    ``planner`` plans (None, or a plan of no moves: nothing more to do).

    The plan is made before anything moves, so that one that cannot be made (no live,
    undrained GPU, say) refuses at once; and made again once unfinished handoffs have
    ended, on the map they left, which is the plan then carried out."""
    listener = listener or Listener()
    plan = planner() if planner is not None else None
    outcomes = drive(client, app, [(i, None) for i in unfinished], parallel=parallel,
                     pause=pause, listener=listener)
    if unfinished and planner is not None:
        plan = planner()
    if plan is not None and plan.moves:
        listener.rebalancing(plan)
        outcomes += drive(client, app, [(m.shard, m.target) for m in plan.moves],
                          parallel=parallel, pause=pause, listener=listener)
    return Rebalanced(list(unfinished), plan, outcomes)


def rebalance(client: redis.Redis, app: AppSource, *, by: str = "count",
              max_moves: int | None = None, drain: str | None = None, dry_run: bool = False,
              parallel: int = 4, pause: tuple[str, float] | None = None,
              listener: Listener | None = None) -> Rebalanced:
    """``gpu-tasks shards rebalance``: every live, undrained GPU gets its share of shards
    (``by`` count or device memory), at most ``max_moves`` moves, once every unfinished
    handoff has ended (``drain``: plan as if that GPU were drained). ``dry_run``: only the
    plan, and what is unfinished."""
    found = unfinished(client)

    def planner() -> Plan:
        return plan_from_redis(client, by=by, max_moves=max_moves, drain=drain)

    if dry_run:
        return Rebalanced(found, planner())
    return finish_and_rebalance(client, app, found, planner, parallel=parallel, pause=pause,
                                listener=listener)


def drain(client: redis.Redis, app: AppSource, gpu: str, *, by: str = "count",
          dry_run: bool = False, parallel: int = 4, pause: tuple[str, float] | None = None,
          listener: Listener | None = None) -> Rebalanced:
    """``gpu-tasks drain``: ``gpu`` takes no more shards, and every shard it has moves to
    the other live GPUs (``dry_run``: only the plan; ``gpu`` stays as it is)."""
    check_gpu(gpu)
    if not dry_run:
        ShardMapStore(client).set_drained(gpu, True)
    return rebalance(client, app, by=by, drain=gpu, dry_run=dry_run, parallel=parallel,
                     pause=pause, listener=listener)


def fail_over_and_resume(client: redis.Redis, app: AppSource, gpu: str, *,
                         parallel: int = 4, pause: tuple[str, float] | None = None,
                         listener: Listener | None = None) -> FailedOver:
    """Fail the dead ``gpu`` over (:func:`gpu_tasks.control.failover.fail_over`; it
    refuses while ``gpu`` has a live worker), then finish or roll back the handoffs it
    was part of."""
    listener = listener or Listener()
    report = fail_over(client, gpu)
    listener.failed_over(report)
    outcomes = drive(client, app, [(i, None) for i in report.resumed], parallel=parallel,
                     pause=pause, listener=listener)
    return FailedOver(report, outcomes)


def move(client: redis.Redis, app: AppSource, shard: int, target: str, *,
         pause: tuple[str, float] | None = None,
         listener: Listener | None = None) -> list[Outcome]:
    """Hand ``shard`` off to ``target`` live; on a shard already being handed off, finish
    or roll back that handoff instead."""
    return drive(client, app, [(shard, target)], parallel=1, pause=pause, listener=listener)
