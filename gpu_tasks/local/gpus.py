"""The GPUs of this host, and which backend serves them: asked of ``nvidia-smi`` and the
installed packages, never of PyCUDA, so the CLI counts GPUs without creating a CUDA
context and without importing ``workers`` (or numpy)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess

from gpu_tasks.errors import ConfigError
from gpu_tasks.settings import BACKENDS


def pycuda_available() -> bool:
    """True when PyCUDA is installed and a GPU driver is visible; imports nothing CUDA."""
    return importlib.util.find_spec("pycuda") is not None and shutil.which("nvidia-smi") is not None


def count_gpus() -> int:
    """GPUs on this host per ``nvidia-smi`` (0 without it); never creates a CUDA context."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return len([line for line in out.splitlines() if line.strip()])


def resolve_backend(name: str) -> str:
    """``auto`` -> ``pycuda`` where PyCUDA and a GPU are present, else ``sim``."""
    if name == "auto":
        return "pycuda" if pycuda_available() and count_gpus() > 0 else "sim"
    if name == "pycuda" and importlib.util.find_spec("pycuda") is None:
        raise ConfigError("backend pycuda needs PyCUDA: pip install 'gpu-tasks[cuda]'")
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; use auto, pycuda or sim")
    return name
