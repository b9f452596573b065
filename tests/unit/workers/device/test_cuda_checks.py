"""What the PyCUDA backend checks before and around its first contact with a GPU, tested
where there is none: compiler on PATH, versions, error classes, the unit and env files,
device objects finalised only on the task thread."""

from __future__ import annotations

import numpy as np
import pytest

from gpu_tasks.errors import BadRequest
from tests.conftest import REPO
from workers.device.base import Buffer
from workers.device.cuda import sticky_error, version_problems
from workers.device.kernels import KERNELS
from workers.device.sim import SimBackend

OPS = REPO / "ops"


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


