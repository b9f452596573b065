"""Remote control that would break a GPU worker is refused by the worker itself.

A GPU worker takes its shard queues' requests in batches (:mod:`workers.consumer.fetch`),
past Celery's own consumer: :func:`install` also makes ``inspect active``, ``reserved`` and
``active_queues`` show them, as Flower's worker pages do.

Flower's buttons and ``celery control`` reach every worker. On a GPU worker some of
them would split or lose device state: a second pool child has a second, empty
buffer store (``pool_grow``, ``autoscale``), a shrunk, restarted or terminated child
takes the device state with it (``pool_shrink``, ``pool_restart``, ``terminate``,
``revoke --terminate``), and consuming or cancelling a queue by hand overrides the
shard map (``add_consumer``, ``cancel_consumer``): one GPU per shard, decided by the
map. :func:`install` replaces those commands in the worker's process with ones that
answer an error saying why and what to do instead. Everything else (``shutdown``,
plain ``revoke``, ``rate_limit``, ``time_limit``, events, inspection) works as usual.
"""

from __future__ import annotations

from typing import Any

from celery.worker import control

from workers.consumer.fetch import BatchFetch

REFUSED = {
    "pool_grow": "a GPU worker runs exactly one pool child, which holds the GPU's device "
                 "state; a second child would have an empty buffer store",
    "autoscale": "a GPU worker runs exactly one pool child, which holds the GPU's device "
                 "state",
    "pool_shrink": "the GPU worker's one pool child holds the GPU's device state",
    "pool_restart": "restarting the pool child would drop every entity's buffers on this "
                    "GPU; restart the worker (systemctl restart) if you mean it",
    "terminate": "terminating a task kills the pool child and every entity's buffers on "
                 "this GPU with it; revoke without terminate, or let the task time limit act",
    "add_consumer": "a GPU worker consumes exactly the queues of the shards the shard map "
                    "gives its GPU; move shards with the shard map, not by hand",
    "cancel_consumer": "a GPU worker consumes exactly the queues of the shards the shard map "
                       "gives its GPU; cancelling one would leave that shard unserved",
}


def _refusal(name: str) -> Any:
    def refuse(state: Any, *args: Any, **kwargs: Any) -> Any:
        return control.nok(f"refused by GPU worker {state.hostname}: {REFUSED[name]}")

    refuse.__name__ = name
    return refuse


def _without_terminate(original: Any) -> Any:
    """``revoke`` and its kin, refusing only ``terminate=True``."""

    def revoke(state: Any, *args: Any, terminate: bool = False, **kwargs: Any) -> Any:
        if terminate:
            return control.nok(
                f"refused by GPU worker {state.hostname}: {REFUSED['terminate']}")
        return original(state, *args, terminate=False, **kwargs)

    return revoke


def install(fetch: BatchFetch | None = None) -> None:
    """Replace the dangerous commands in this process's control panel (a GPU worker), and
    make inspection see ``fetch``'s batches."""
    for name in REFUSED:
        control.Panel.data[name] = _refusal(name)
    for name in ("revoke", "revoke_by_stamped_headers"):
        control.Panel.data[name] = _without_terminate(control.Panel.data[name])
    if fetch is None:
        return
    celery_active = control.Panel.data["active"]
    celery_reserved = control.Panel.data["reserved"]
    celery_queues = control.Panel.data["active_queues"]

    def active(state: Any, safe: bool = False, **kwargs: Any) -> Any:
        return [*celery_active(state, safe=safe, **kwargs),
                *fetch.active(state.hostname, safe=safe)]

    def reserved(state: Any, **kwargs: Any) -> Any:
        return [*celery_reserved(state, **kwargs), *fetch.reserved(state.hostname)]

    def active_queues(state: Any) -> Any:
        return [*celery_queues(state), *fetch.queue_infos()]

    control.Panel.data.update(active=active, reserved=reserved, active_queues=active_queues)
