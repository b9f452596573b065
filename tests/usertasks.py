"""Users' own GPU tasks, imported by the test cluster's workers (GPU_TASKS_IMPORTS)."""

from __future__ import annotations

import os
import time
from typing import Any

from gpu_tasks.tasks.declare import gpu_task


@gpu_task(name="tests.normalize")
def normalize(gpu: Any, name: str) -> dict[str, Any]:
    """Divide the entity's buffer by its sum, in place, using the buffer store directly."""
    values = gpu.read(name)
    total = float(values.sum())
    gpu.write(name, values / total)
    return {"total": total, "names": gpu.names(), "shard": gpu.shard}


@gpu_task(name="tests.slow")
def slow(gpu: Any, seconds: float, marker: str) -> dict[str, Any]:
    """Sleep, then record that it ran; for tests that kill a worker mid-task."""
    gpu.alloc(marker, [1], "int32")
    time.sleep(seconds)
    return {"pid": os.getpid()}


@gpu_task
def whoami(gpu: Any) -> int:
    return gpu.generation


_client: Any = None


def executions_client() -> Any:
    """A Redis client of the worker's deployment, made once per pool child."""
    global _client
    if _client is None:
        from gpu_tasks import settings

        _client = settings.current().redis_client()
    return _client


@gpu_task(name="tests.record")
def record(gpu: Any, log: str, seq: int = 0, seconds: float = 0.0) -> dict[str, Any]:
    """Append ``<entity>:<seq>`` to the Redis list ``log`` once per execution, so tests count
    executions, not results. With ``seconds``, first mark ``<log>:running`` and sleep: a test
    can kill the worker while this request is certainly mid-execution."""
    client = executions_client()
    if seconds:
        client.set(f"{log}:running", f"{gpu.entity_id}:{seq}")
        time.sleep(seconds)
    client.rpush(log, f"{gpu.entity_id}:{seq}")
    return {"seq": seq}


@gpu_task(name="tests.record_file")
def record_file(gpu: Any, path: str, seq: int, seconds: float = 0.0) -> dict[str, Any]:
    """Sleep ``seconds``, then append ``<seq> <unix time>`` to the file ``path`` once per
    execution: for tests that count executions where Redis itself fails over (and may lose
    what was written to it), so the count cannot live there."""
    if seconds:
        time.sleep(seconds)
    # One small O_APPEND write per line: lines from several workers never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{seq} {time.time():.3f}\n".encode())
    finally:
        os.close(fd)
    return {"seq": seq}


@gpu_task(name="tests.step")
def step(gpu: Any, log: str, seq: int) -> dict[str, Any]:
    """Step ``seq`` of the entity's history (tests/support/history.py): read its counter, write
    ``seq`` there, record ``<entity>:<seq>:<previous>``. A counter reported lost
    (``EntityStateLost``) is allocated again and recorded as previous -1."""
    from gpu_tasks.errors import EntityStateLost

    if seq == 0:
        gpu.alloc("counter", [1], "int64")
    try:
        previous = int(gpu.read("counter")[0])
    except EntityStateLost:
        gpu.alloc("counter", [1], "int64")
        previous = -1
    gpu.write("counter", [seq])
    executions_client().rpush(log, f"{gpu.entity_id}:{seq}:{previous}")
    return {"previous": previous}


@gpu_task(name="tests.die")
def die(gpu: Any) -> None:
    """End the pool child running it, every time: a request that would kill every child."""
    os._exit(9)
