"""CUDA checks that run a program: a missing nvcc fails the open with advice, a fake one's
version is read (no GPU needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpu_tasks.errors import ConfigError
from workers.device.cuda_checks import require_nvcc


def test_a_missing_compiler_fails_the_open_with_advice(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvcc there
    with pytest.raises(ConfigError, match=r"nvcc is not on PATH.*/etc/gpu-tasks/env"):
        require_nvcc()
    from workers.device.cuda import CudaBackend

    with pytest.raises(ConfigError, match="nvcc is not on PATH"):
        CudaBackend(gpu_index=0).open()  # before anything imports PyCUDA
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    nvcc.chmod(0o755)
    assert require_nvcc() == str(nvcc)
    from workers.device.cuda_checks import nvcc_version

    assert nvcc_version(str(nvcc)) == (12, 4)
