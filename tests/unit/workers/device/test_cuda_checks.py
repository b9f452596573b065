"""What the PyCUDA backend checks before and around its first contact with a GPU, tested
where there is none: compiler on PATH, versions, error classes, the unit and env files,
device objects finalised only on the task thread."""

from __future__ import annotations

import gc
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpu_tasks.errors import BadRequest, ConfigError
from gpu_tasks.settings import Settings
from workers.backend import Buffer
from workers.cuda import require_nvcc, sticky_error, version_problems
from workers.kernels import KERNELS
from workers.runtime import DeviceRuntime, WorkerIdentity
from workers.sim import SimBackend

OPS = Path(__file__).resolve().parents[2] / "ops"


@pytest.mark.parametrize(("text", "sticky"), [
    ("cuLaunchKernel failed: an illegal memory access was encountered", True),
    ("cuCtxSynchronize failed: unspecified launch failure", True),
    ("cuMemcpyDtoH failed: misaligned address", True),
    ("cuLaunchKernel failed: device-side assert triggered", True),
    # CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, which PyCUDA raises as LaunchError too
    ("cuLaunchKernel failed: too many resources requested for launch", False),
    ("cuModuleLoadDataEx failed: the provided PTX was compiled with an unsupported "
     "toolchain", False),
    ("cuMemAlloc failed: out of memory", False),
])
def test_errors_are_classified_by_what_they_say_not_their_class(text: str,
                                                                 sticky: bool) -> None:
    assert sticky_error(text) is sticky


def test_versions_the_driver_cannot_run_are_named_with_what_to_do() -> None:
    assert version_problems((13, 0), (13, 0), (13, 0)) == []
    assert version_problems((12, 4), (12, 2), (12, 4)) == []
    built, toolkit = version_problems((12, 4), (13, 0), (13, 0))
    assert "PyCUDA was built against CUDA 13.0" in built and "up to 12.4" in built
    assert "R580" in built
    assert "nvcc is from CUDA 13.0" in toolkit and "would not load" in toolkit
    assert version_problems((12, 9), None, None) == []


def test_a_missing_compiler_fails_the_open_with_advice(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvcc there
    with pytest.raises(ConfigError, match=r"nvcc is not on PATH.*/etc/gpu-tasks/env"):
        require_nvcc()
    from workers.cuda import CudaBackend

    with pytest.raises(ConfigError, match="nvcc is not on PATH"):
        CudaBackend(gpu_index=0).open()  # before anything imports PyCUDA
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    nvcc.chmod(0o755)
    assert require_nvcc() == str(nvcc)
    from workers.cuda import nvcc_version

    assert nvcc_version(str(nvcc)) == (12, 4)


def test_the_worker_unit_puts_the_toolkit_on_path_and_the_env_file_says_how_to_move_it(
        ) -> None:
    unit = (OPS / "systemd" / "gpu-tasks-worker@.service").read_text().splitlines()
    (path,) = [line.removeprefix("Environment=PATH=") for line in unit
               if line.startswith("Environment=PATH=")]
    entries = path.split(":")
    assert "/usr/local/cuda/bin" in entries and "/opt/gpu-tasks/.venv/bin" in entries
    assert "/usr/bin" in entries
    env = (OPS / "env.example").read_text()
    assert "#PATH=" in env and "nvcc" in env
    assert "#GPU_TASKS_DEVICE_OPEN_TIMEOUT_S=" in env


def test_sgemm_dimensions_beyond_int32_are_a_bad_request() -> None:
    def buf(name: str, shape: tuple[int, int]) -> Buffer:
        return Buffer("e", name, np.dtype("float32"), shape, 1, None)

    bufs = {"a": buf("a", (2, 1 << 31)), "b": buf("b", (1 << 31, 2)), "c": buf("c", (2, 2))}
    with pytest.raises(BadRequest, match=r"a has shape \[2, 2147483648\]") as raised:
        KERNELS["sgemm"].body(SimBackend(node="n", gpu_index=0, capacity_bytes=1), bufs,
                              {"alpha": 1.0, "beta": 0.0})
    assert raised.value.field == "a"


def test_device_objects_are_finalised_on_the_task_thread_only(
        monkeypatch: pytest.MonkeyPatch, spare_url: str) -> None:
    # Given a runtime whose backend needs its objects finalised on the task thread
    from gpu_tasks.shardmap import ShardMap, ShardMapStore

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
