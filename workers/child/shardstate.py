"""Moving one shard's device state from one GPU to another, through Redis.

A handoff (driven by :mod:`gpu_tasks.control.handoff`) runs these as tasks on each GPU's own
queue, so they run on the pool child's task thread like any request:

- :func:`export_shard` on the GPU giving the shard up: every buffer of the shard's
  entities, device -> host -> Redis, with the SHA-256 of its bytes, and a manifest
  listing them. It runs once the GPU has stopped consuming the shard's queue and has
  finished every request of it that it had taken, so the state is final.
- :func:`import_shard` on the GPU taking it: Redis -> host, each buffer checked against
  the manifest, -> device. All or nothing: if a buffer does not fit (``OutOfMemory``) or
  its bytes do not match, what was imported is freed and the error says so; the shard
  then stays where it was.
- :func:`release_shard` on the GPU that gave it up, once the new owner serves it: frees
  the exported buffers (state that moved is not lost).

The Redis keys of a handoff's exported state are in :mod:`gpu_tasks.control.handoff`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import numpy as np
import redis

from gpu_tasks.control.handoff import CHUNK_BYTES, STATE_TTL_S
from gpu_tasks.errors import BadRequest, DeviceError, OutOfMemory
from gpu_tasks.keys import CHUNK_KEY, MANIFEST_KEY
from gpu_tasks.protocol.routing import shard_name
from workers.consumer import ownership
from workers.device.store import BufferStore

log = logging.getLogger(__name__)


def _check_handoff(handoff: object) -> str:
    if not isinstance(handoff, str) or not handoff or len(handoff) > 64:
        raise BadRequest(f"handoff must be a handoff id, got {handoff!r}", "handoff")
    return handoff


def _shard_index(shard: object) -> int:
    """``shard`` if it is a shard index, else :class:`BadRequest` naming it."""
    if isinstance(shard, bool) or not isinstance(shard, int) or shard < 0:
        raise BadRequest(f"shard must be a shard index, got {shard!r}", "shard")
    return shard


def _check_shard(shard: object, *, serving: bool) -> int:
    """``shard`` if this GPU holds its state and does (``serving``) or does not serve it."""
    shard = _shard_index(shard)
    table = ownership.table
    if table is not None:
        held, served = shard in table.held(), table.serves(shard)
        if not held or served != serving:
            doing = "serves" if served else "holds" if held else "neither serves nor holds"
            raise DeviceError(
                f"{shard_name(shard)}: this GPU {doing} it at shard map epoch {table.epoch}, "
                "which this step of a handoff does not expect; the handoff's driver retries "
                "once the worker has followed the map")
    return shard


def export_shard(store: BufferStore, client: redis.Redis, gpu: str, shard: object,
                 handoff: object) -> dict[str, Any]:
    """Write shard ``shard``'s state to Redis for handoff ``handoff``; returns a summary."""
    index = _check_shard(shard, serving=False)
    handoff_id = _check_handoff(handoff)
    started = time.monotonic()
    buffers = []
    pipe = client.pipeline(transaction=False)
    total = 0
    for n, buf in enumerate(store.shard_buffers(index)):
        raw = store.host_copy(buf).astype(buf.dtype.newbyteorder("<"), copy=False)
        data = raw.tobytes()
        chunks = max(1, -(-len(data) // CHUNK_BYTES))
        for c in range(chunks):
            pipe.set(CHUNK_KEY.format(handoff=handoff_id, n=n, chunk=c),
                     data[c * CHUNK_BYTES:(c + 1) * CHUNK_BYTES], ex=STATE_TTL_S)
        pipe.execute()  # one buffer at a time: host memory holds at most one copy
        buffers.append({"entity_id": buf.entity_id, "name": buf.name, "dtype": buf.dtype.name,
                        "shape": list(buf.shape), "nbytes": buf.nbytes,
                        "sha256": hashlib.sha256(data).hexdigest(), "chunks": chunks})
        total += buf.nbytes
    manifest = {"handoff": handoff_id, "shard": index, "source": gpu,
                "generation": store.generation, "bytes": total, "buffers": buffers}
    client.set(MANIFEST_KEY.format(handoff=handoff_id), json.dumps(manifest), ex=STATE_TTL_S)
    store.exported[index] = handoff_id
    return {"handoff": handoff_id, "shard": index, "buffers": len(buffers),
            "entities": len({b["entity_id"] for b in buffers}), "bytes": total,
            "seconds": round(time.monotonic() - started, 4)}


def import_shard(store: BufferStore, client: redis.Redis, shard: object,
                 handoff: object, version: object = 0) -> dict[str, Any]:
    """Allocate and fill shard ``shard``'s buffers from handoff ``handoff``'s export; they are
    the shard's state at ``version`` (its version once the handoff commits)."""
    index = _check_shard(shard, serving=False)
    handoff_id = _check_handoff(handoff)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise BadRequest(f"version must be a shard version, got {version!r}", "version")
    started = time.monotonic()
    raw_manifest = client.get(MANIFEST_KEY.format(handoff=handoff_id))
    if raw_manifest is None:
        raise DeviceError(f"handoff {handoff_id}: no exported state in Redis (expired, or "
                          "the export never finished)")
    manifest = json.loads(raw_manifest)
    if manifest["shard"] != index:
        raise BadRequest(f"handoff {handoff_id} carries shard-{manifest['shard']}, not "
                         f"shard-{index}", "shard")
    store.drop_shards([index], "", lose=False)  # leftovers of an abandoned import
    free_bytes, _ = store.backend.mem_info()
    if manifest["bytes"] > free_bytes:
        raise OutOfMemory(
            f"{shard_name(index)} holds {manifest['bytes']} bytes of state on "
            f"{manifest['source']}; this GPU has {free_bytes} bytes free",
            int(manifest["bytes"]), int(free_bytes))
    try:
        for n, entry in enumerate(manifest["buffers"]):
            keys = [CHUNK_KEY.format(handoff=handoff_id, n=n, chunk=c)
                    for c in range(entry["chunks"])]
            parts = [p for p in client.mget(keys) if isinstance(p, bytes)]
            if len(parts) != len(keys):
                raise DeviceError(f"handoff {handoff_id}: buffer {entry['name']!r} of entity "
                                  f"{entry['entity_id']!r} is missing from Redis")
            data = b"".join(parts)
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise DeviceError(f"handoff {handoff_id}: buffer {entry['name']!r} of entity "
                                  f"{entry['entity_id']!r} does not match its checksum")
            buf = store.alloc(entry["entity_id"], entry["name"], entry["shape"], entry["dtype"])
            host = np.frombuffer(data, dtype=buf.dtype.newbyteorder("<")).astype(buf.dtype)
            store.backend.upload(buf, host.reshape(-1), 0)
        store.versions[index] = version
    except BaseException:
        # All or nothing: the shard stays where it was, so nothing of it may stay here.
        store.drop_shards([index], "", lose=False)
        raise
    return {"handoff": handoff_id, "shard": index, "buffers": len(manifest["buffers"]),
            "bytes": manifest["bytes"], "seconds": round(time.monotonic() - started, 4)}


def release_shard(store: BufferStore, shard: object, handoff: object) -> dict[str, Any]:
    """Free the state of a shard whose handoff is complete (it moved: nothing is lost)."""
    index = _shard_index(shard)
    handoff_id = _check_handoff(handoff)
    table = ownership.table
    if table is not None and index in table.held():
        raise DeviceError(f"{shard_name(index)} is still held by this GPU at shard map epoch "
                          f"{table.epoch}: its handoff has not completed")
    if store.exported.get(index) not in (None, handoff_id):
        raise DeviceError(f"{shard_name(index)} was exported for handoff "
                          f"{store.exported[index]}, not {handoff_id}")
    freed = store.drop_shards([index], "when its shard stopped being served here")
    return {"handoff": handoff_id, "shard": index, "freed_buffers": freed}
