"""The built-in tasks' work on the GPU side (their signatures are in ``gpu_tasks.tasks``).

Payloads are JSON: binary data travels as base64 of the raw little-endian
bytes, with ``dtype`` and ``shape`` beside it.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np

from gpu_tasks.errors import BadRequest
from workers import runtime
from workers.runtime import EntityContext


def alloc(gpu: EntityContext, name: str, shape: Any, dtype: Any) -> dict[str, Any]:
    buf = gpu.alloc(name, shape, dtype)
    return {"buffer": buf.describe(), "entity_bytes": gpu.store.usage(gpu.entity_id).bytes}


def write(
    gpu: EntityContext, name: str, values: Any, data_b64: Any, offset: Any, generation: int | None
) -> dict[str, Any]:
    if (values is None) == (data_b64 is None):
        raise BadRequest(
            "give exactly one of values (a list) or data_b64 (base64 bytes)",
            "values" if values is None else "data_b64",
        )
    if values is not None:
        if not isinstance(values, list) or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) for v in values
        ):
            raise BadRequest("values must be a flat list of numbers", "values")
        data: Any = values
    else:
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
        data = np.frombuffer(raw, dtype=buf.dtype.newbyteorder("<"))
    buf = gpu.write(name, data, offset, generation)
    count = len(values) if values is not None else int(data.size)
    return {"buffer": buf.describe(), "written": count, "offset": offset}


def read(gpu: EntityContext, name: str, as_list: Any, generation: int | None) -> dict[str, Any]:
    host = gpu.read(name, generation)
    result: dict[str, Any] = {
        "name": name,
        "dtype": host.dtype.name,
        "shape": list(host.shape),
        "data_b64": base64.b64encode(host.astype(host.dtype.newbyteorder("<")).tobytes()).decode(),
    }
    if as_list:
        result["values"] = host.reshape(-1).tolist()
    return result


def free(gpu: EntityContext, name: str | None) -> dict[str, Any]:
    freed = gpu.free(name)
    return {"freed": [b.name for b in freed], "freed_bytes": sum(b.nbytes for b in freed)}


def run(
    gpu: EntityContext, kernel: Any, generation: int | None, params: dict[str, Any]
) -> dict[str, Any]:
    return gpu.launch(kernel, generation, **params)


def stats() -> dict[str, Any]:
    rt = runtime.current()
    free_bytes, total_bytes = rt.backend.mem_info()
    return {
        **rt.where(),
        **rt.store.totals(),
        "free_bytes": free_bytes,
        "total_bytes": total_bytes,
        "device_name": rt.backend.info.name,
        "backend": rt.backend.info.backend,
    }
