"""The built-in device tasks, routed by entity (``stats`` goes to one GPU's queue).

Every result is a JSON object that says where it ran: ``entity_id``, ``shard``,
``queue`` (the shard's queue), ``gpu``, ``worker``, ``device``, ``generation``.
Buffers are named per entity; ``generation`` (optional on every buffer task) is the
context generation a caller saw when it allocated: a mismatch fails with
``StaleHandle``. Device errors come back as the exceptions in :mod:`gpu_tasks.errors`.

These are declarations (names, signatures, documentation): the GPU worker's boot
installs their implementations, :mod:`workers.child.handlers`, so producers stay light.
"""

# The bodies here are declarations: a GPU worker runs workers.child.handlers instead.
# mypy: disable-error-code="empty-body"

from __future__ import annotations

from typing import Any

from gpu_tasks.tasks.declare import gpu_queue_task, gpu_task

__all__ = ["alloc", "export_shard", "free", "import_shard", "read", "release_shard", "run",
           "stats", "write"]


@gpu_task(name="gpu_tasks.alloc", flat_result=True)
def alloc(gpu: Any, name: str, shape: list[int] | int, dtype: str = "float32") -> dict[str, Any]:
    """A zeroed device buffer ``name`` owned by the entity, replacing one of that name; a
    replacement that fails (``OutOfMemory``, the entity's quota or buffer limit) leaves the
    old buffer as it was. One entity holds at most ``GPU_TASKS_MAX_BUFFERS_PER_ENTITY``
    buffers (1024) on a GPU: one more fails with ``BadRequest`` (field ``name``)."""


@gpu_task(name="gpu_tasks.write", flat_result=True)
def write(
    gpu: Any,
    name: str,
    values: list[float] | None = None,
    data_b64: str | None = None,
    offset: int = 0,
    generation: int | None = None,
    cast: str = "safe",
) -> dict[str, Any]:
    """Host -> device: ``values`` (a flat list) or ``data_b64`` (raw bytes of the buffer's
    dtype, little-endian) written from element ``offset``.

    ``cast="safe"`` (the default) refuses a value the buffer's dtype cannot hold with
    ``BadRequest`` naming it, e.g. ``values[1] = nan cannot be stored in int32``: NaN,
    infinity or a non-integral float into an integer dtype, an integer out of its range,
    a float that would overflow a float dtype to infinity (70000 into float16).
    ``cast="unsafe"`` stores numpy's cast instead (300 into uint8 is 44)."""


@gpu_task(name="gpu_tasks.read", flat_result=True)
def read(
    gpu: Any,
    name: str,
    as_list: bool = False,
    generation: int | None = None,
    offset: int = 0,
    count: int | None = None,
) -> dict[str, Any]:
    """Device -> host: ``dtype``, ``shape`` (the buffer's), ``offset``, ``count``,
    ``data_b64``, and ``values`` (a flat list) if ``as_list``: elements ``[offset, offset +
    count)`` of the flattened buffer (``count`` None: to its end). One read returns at most
    ``GPU_TASKS_MAX_READ`` bytes (64 MiB), and with ``as_list`` at most
    ``GPU_TASKS_MAX_READ_VALUES`` elements (1,000,000); a larger one fails with
    ``BadRequest`` (field ``count``) saying how to read it in parts."""


@gpu_task(name="gpu_tasks.free", flat_result=True)
def free(gpu: Any, name: str | None = None) -> dict[str, Any]:
    """Free buffer ``name``, or every buffer of the entity when no name is given."""


@gpu_task(name="gpu_tasks.run", flat_result=True)
def run(gpu: Any, kernel: str, generation: int | None = None, cast: str = "safe",
        **params: Any) -> dict[str, Any]:
    """Launch a named kernel on the entity's buffers: ``fill(out, value)``,
    ``scale(x, alpha, out=x)``, ``axpy(x, y, alpha=1)``, ``sum(x)``,
    ``sgemm(a, b, c, alpha=1, beta=0)``; buffer parameters take buffer names.

    Scalars are finite numbers computed in the buffer's dtype (``value`` in ``out``'s,
    ``alpha`` in ``x``'s or ``y``'s, sgemm's in float32); with ``cast="safe"`` (the default)
    one the dtype cannot hold fails with ``BadRequest`` naming it (fill of 300 into uint8,
    scale of an int32 buffer by 1.5); ``cast="unsafe"`` uses numpy's cast instead."""


@gpu_queue_task(name="gpu_tasks.stats")
def stats(gpu: Any) -> dict[str, Any]:
    """This GPU's free/total bytes, buffers, entities, owned shards and generation.
    Send it to a GPU's queue: ``stats.apply_async(queue="gpu.<node>.<i>")``."""



# The steps of a live handoff (gpu_tasks.control.handoff drives them), each sent to one GPU's own
# queue so that it runs after everything that GPU had taken.


@gpu_queue_task(name="gpu_tasks.export_shard")
def export_shard(gpu: Any, shard: int, handoff: str) -> dict[str, Any]:
    """Write the state of ``shard`` (which this GPU holds but no longer serves) to Redis for
    ``handoff``, with checksums: ``entities``, ``buffers``, ``bytes``, ``seconds``."""


@gpu_queue_task(name="gpu_tasks.import_shard")
def import_shard(gpu: Any, shard: int, handoff: str, version: int = 0) -> dict[str, Any]:
    """Load ``shard``'s state exported for ``handoff`` onto this GPU, checking every checksum;
    all or nothing (``OutOfMemory`` if it does not fit). ``version``: the shard's version
    once the handoff commits."""


@gpu_queue_task(name="gpu_tasks.release_shard")
def release_shard(gpu: Any, shard: int, handoff: str) -> dict[str, Any]:
    """Free this GPU's copy of ``shard`` once ``handoff`` has given it to another GPU."""
