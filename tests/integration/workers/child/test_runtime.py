"""The pool child's runtime against a real Redis: device objects are finalised on the task
thread only."""

from __future__ import annotations

import gc
import threading
from typing import Any

import pytest

from gpu_tasks.settings import Settings
from workers.child.runtime import DeviceRuntime, WorkerIdentity
from workers.device.sim import SimBackend


def test_device_objects_are_finalised_on_the_task_thread_only(
        monkeypatch: pytest.MonkeyPatch, spare_url: str) -> None:
    # Given a runtime whose backend needs its objects finalised on the task thread
    from gpu_tasks.control.shardmap import ShardMap, ShardMapStore

    settings = Settings(redis_url=spare_url, node="n", sim_memory_bytes=1 << 20)
    ShardMapStore(settings.redis_client()).create(ShardMap.balanced(["gpu.n.0"], 4))
    monkeypatch.setattr(SimBackend, "collects_garbage", True, raising=False)
    was_enabled = gc.isenabled()
    try:
        runtime = DeviceRuntime(WorkerIdentity("n", 0, "sim"), settings,
                                settings.redis_client())
        assert not gc.isenabled()
        finalised_on: list[str] = []

        class DeviceObject:
            def __del__(self) -> None:
                finalised_on.append(threading.current_thread().name)

        def make_cyclic_garbage() -> None:
            holder: dict[str, Any] = {"device": DeviceObject()}
            holder["self"] = holder  # a cycle, as a traceback's frames make

        make_cyclic_garbage()
        # When another thread (the heartbeat's) allocates a lot meanwhile
        other = threading.Thread(target=lambda: [list(range(10)) for _ in range(100_000)],
                                 name="heartbeat")
        other.start()
        other.join()
        assert finalised_on == []
        # Then the garbage is collected after the task, on the task thread
        runtime.after_task()
        assert finalised_on == [threading.current_thread().name]
        runtime.backend.close()
    finally:
        if was_enabled:
            gc.enable()
