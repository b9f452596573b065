"""The built-in device tasks, routed by entity (``stats`` goes to one GPU's queue).

Every result is a JSON object that says where it ran: ``entity_id``, ``shard``,
``queue`` (the shard's queue), ``gpu``, ``worker``, ``device``, ``generation``.
Buffers are named per entity; ``generation`` (optional on every buffer task) is the
context generation a caller saw when it allocated: a mismatch fails with
``StaleHandle``. Device errors come back as the exceptions in :mod:`gpu_tasks.errors`.

These are declarations (names, signatures, documentation): the GPU worker's boot
installs their implementations, :mod:`workers.handlers`, so producers stay light.
"""

# The bodies here are declarations: a GPU worker runs workers.handlers instead.
# mypy: disable-error-code="empty-body"

from __future__ import annotations

from typing import Any

from gpu_tasks.task import gpu_queue_task, gpu_task

__all__ = ["alloc", "export_shard", "free", "import_shard", "read", "release_shard", "run",
           "stats", "write"]


@gpu_task(name="gpu_tasks.alloc", flat_result=True)
def alloc(gpu: Any, name: str, shape: list[int] | int, dtype: str = "float32") -> dict[str, Any]:
    """A zeroed device buffer ``name`` owned by the entity (replacing one of that name)."""


@gpu_task(name="gpu_tasks.write", flat_result=True)
def write(
    gpu: Any,
    name: str,
    values: list[float] | None = None,
    data_b64: str | None = None,
    offset: int = 0,
    generation: int | None = None,
) -> dict[str, Any]:
    """Host -> device: ``values`` (a flat list) or ``data_b64`` (raw bytes of the buffer's
    dtype, little-endian) written from element ``offset``."""


@gpu_task(name="gpu_tasks.read", flat_result=True)
def read(
    gpu: Any, name: str, as_list: bool = False, generation: int | None = None
) -> dict[str, Any]:
    """Device -> host: ``dtype``, ``shape``, ``data_b64``, and ``values`` if ``as_list``."""


@gpu_task(name="gpu_tasks.free", flat_result=True)
def free(gpu: Any, name: str | None = None) -> dict[str, Any]:
    """Free buffer ``name``, or every buffer of the entity when no name is given."""


@gpu_task(name="gpu_tasks.run", flat_result=True)
def run(gpu: Any, kernel: str, generation: int | None = None, **params: Any) -> dict[str, Any]:
    """Launch a named kernel on the entity's buffers: ``fill(out, value)``,
    ``scale(x, alpha, out=x)``, ``axpy(x, y, alpha=1)``, ``sum(x)``,
    ``sgemm(a, b, c, alpha=1, beta=0)``; buffer parameters take buffer names."""


@gpu_queue_task(name="gpu_tasks.stats")
def stats(gpu: Any) -> dict[str, Any]:
    """This GPU's free/total bytes, buffers, entities, owned shards and generation.
    Send it to a GPU's queue: ``stats.apply_async(queue="gpu.<node>.<i>")``."""



# The steps of a live handoff (gpu_tasks.handoff drives them), each sent to one GPU's own
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
