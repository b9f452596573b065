"""The built-in tasks' implementations (``gpu_tasks.tasks`` declares them).

A GPU worker's boot installs :data:`IMPLEMENTATIONS`, so the declared task of each
name runs the function here. Payloads are JSON: binary data travels as base64 of
the raw little-endian bytes, with ``dtype`` and ``shape`` beside it.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any

import numpy as np

from gpu_tasks import tasks
from gpu_tasks.errors import BadRequest, NoSuchBuffer, StaleHandle
from workers.child import shardstate
from workers.child.runtime import EntityContext, GpuContext, element_range
from workers.consumer import ownership


def alloc(gpu: EntityContext, name: Any, shape: Any, dtype: Any = "float32") -> dict[str, Any]:
    buf = gpu.alloc(name, shape, dtype)
    return {"buffer": buf.describe(), "entity_bytes": gpu.store.usage(gpu.entity_id).bytes}


def write(
    gpu: EntityContext,
    name: Any,
    values: Any = None,
    data_b64: Any = None,
    offset: Any = 0,
    generation: Any = None,
    cast: Any = "safe",
) -> dict[str, Any]:
    if (values is None) == (data_b64 is None):
        raise BadRequest(
            "give exactly one of values (a list) or data_b64 (base64 bytes)",
            "values" if values is None else "data_b64",
        )
    if values is not None:
        if not isinstance(values, list):
            raise BadRequest("values must be a flat list of numbers", "values")
        buf = gpu.write(name, values, offset, generation, cast, "values")
        return {"buffer": buf.describe(), "written": len(values), "offset": offset}
    buf = gpu.buffer(name, generation)
    if not isinstance(data_b64, str):
        raise BadRequest("data_b64 must be a base64 string", "data_b64")
    try:
        raw = base64.b64decode(data_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"data_b64 is not valid base64: {exc}", "data_b64") from None
    if len(raw) % buf.dtype.itemsize:
        raise BadRequest(
            f"data_b64 holds {len(raw)} bytes, not a whole number of "
            f"{buf.dtype.name} elements ({buf.dtype.itemsize} bytes each)",
            "data_b64",
        )
    # Raw bytes of the buffer's own dtype: every bit pattern is a value of it, so there is
    # nothing to cast (cast is still checked, so a bad one is refused either way).
    data = np.frombuffer(raw, dtype=buf.dtype.newbyteorder("<"))
    buf = gpu.write(name, data, offset, generation, cast, "data_b64")
    return {"buffer": buf.describe(), "written": int(data.size), "offset": offset}


def read(gpu: EntityContext, name: Any, as_list: Any = False, generation: Any = None,
         offset: Any = 0, count: Any = None) -> dict[str, Any]:
    if not isinstance(as_list, bool):
        raise BadRequest(f"as_list must be true or false, got {as_list!r}", "as_list")
    buf = gpu.buffer(name, generation)
    start, size = element_range(buf, offset, count)
    settings = gpu.settings
    # A result this large would be held several times over while it is encoded, and may
    # be refused by Redis; the caller reads it in parts instead.
    limit, what = settings.max_read_bytes // buf.dtype.itemsize, "GPU_TASKS_MAX_READ bytes"
    if as_list and settings.max_read_values < limit:
        limit, what = settings.max_read_values, "GPU_TASKS_MAX_READ_VALUES elements with as_list"
    if size > limit:
        raise BadRequest(
            f"reading {size} elements of buffer {name!r} ({size * buf.dtype.itemsize} bytes "
            f"of {buf.dtype.name}) is more than one read returns ({limit} elements: "
            f"{what}); read it in parts with offset and count: offset={start}, "
            f"count={limit}, then offset={start + limit}, and so on",
            "count",
        )
    host = gpu.read(name, generation, start, size)
    result: dict[str, Any] = {
        "name": name,
        "dtype": host.dtype.name,
        "shape": list(buf.shape),
        "offset": start,
        "count": size,
        "data_b64": base64.b64encode(host.astype(host.dtype.newbyteorder("<")).tobytes()).decode(),
    }
    if as_list:
        result["values"] = host.tolist()
    return result


def free(gpu: EntityContext, name: Any = None) -> dict[str, Any]:
    try:
        freed = gpu.free(name)
    except (NoSuchBuffer, StaleHandle):
        if not gpu.redelivered:
            raise
        # Delivered again after a first delivery that may have freed it (its worker died
        # or lost Redis before acknowledging): the buffer is gone, which is what was asked.
        return {"freed": [], "freed_bytes": 0, "already_gone": [name]}
    return {"freed": [b.name for b in freed], "freed_bytes": sum(b.nbytes for b in freed)}


def run(gpu: EntityContext, kernel: Any, generation: Any = None, cast: Any = "safe",
        **params: Any) -> dict[str, Any]:
    return gpu.launch(kernel, generation, cast, **params)


def stats(gpu: GpuContext) -> dict[str, Any]:
    free_bytes, total_bytes = gpu.device.mem_info()
    table = ownership.table
    return {
        **gpu.store.totals(),
        "free_bytes": free_bytes,
        "total_bytes": total_bytes,
        "device_name": gpu.device.info.name,
        "backend": gpu.device.info.backend,
        "shards": len(table.served()) if table is not None else None,
        "shard_map_epoch": table.epoch if table is not None else None,
    }


def export_shard(gpu: GpuContext, shard: Any, handoff: Any) -> dict[str, Any]:
    return shardstate.export_shard(gpu.store, gpu.runtime.client, gpu.runtime.identity.queue,
                                   shard, handoff)


def import_shard(gpu: GpuContext, shard: Any, handoff: Any, version: Any = 0) -> dict[str, Any]:
    return shardstate.import_shard(gpu.store, gpu.runtime.client, shard, handoff, version)


def release_shard(gpu: GpuContext, shard: Any, handoff: Any) -> dict[str, Any]:
    return shardstate.release_shard(gpu.store, shard, handoff)


IMPLEMENTATIONS: dict[str, Callable[..., Any]] = {
    tasks.alloc.name: alloc,
    tasks.write.name: write,
    tasks.read.name: read,
    tasks.free.name: free,
    tasks.run.name: run,
    tasks.stats.name: stats,
    tasks.export_shard.name: export_shard,
    tasks.import_shard.name: import_shard,
    tasks.release_shard.name: release_shard,
}
"""What runs for each built-in task name."""
