"""The device backend interface, and picking one.

A backend owns one device context in one process (a worker's pool child) and
does the device work: allocate, copy, run kernels. Bookkeeping (which entity owns
what, quotas, generations) lives above it in :mod:`workers.store`, so ``sim`` and
``pycuda`` differ only in where the bytes live and who does the arithmetic.

Kernel arguments reach a backend already checked by :mod:`workers.kernels`
(dtypes supported, shapes compatible), so backends only compute.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from gpu_tasks.errors import ConfigError

# dtypes every backend stores; kernels narrow this further (see workers.kernels).
DTYPES = ("float16", "float32", "float64", "int32", "int64", "uint8")


class DevicePoisoned(Exception):
    """Raised by a backend when its context is unusable and must be rebuilt."""


@dataclass(frozen=True)
class DeviceInfo:
    """What the fleet registry records about a device."""

    backend: str
    name: str
    uuid: str
    total_bytes: int


@dataclass
class Buffer:
    """A named device buffer owned by one entity."""

    entity_id: str
    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    generation: int
    allocation: Any
    """The device memory; None while the buffer is spilled to :attr:`host`."""
    host: np.ndarray[Any, Any] | None = None
    """The buffer's contents in host memory while it is spilled (passivated)."""

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype.name,
            "shape": list(self.shape),
            "nbytes": self.nbytes,
            "generation": self.generation,
        }


class Backend(Protocol):
    """One device context. Every method runs in the thread that called :meth:`open`."""

    info: DeviceInfo

    def open(self) -> None:
        """Create the context (in the pool child, after fork) and check it is on our device."""

    def close(self) -> None:
        """Release every allocation and the context."""

    def mem_info(self) -> tuple[int, int]:
        """(free_bytes, total_bytes) as the device reports them."""

    def alloc(self, nbytes: int) -> Any:
        """Zeroed device memory of ``nbytes``; raises ``OutOfMemory`` if it does not fit."""

    def release(self, allocation: Any) -> None: ...

    def upload(self, buf: Buffer, host: np.ndarray[Any, Any], offset: int) -> None:
        """Copy ``host`` (buf's dtype, 1-D) into ``buf`` starting at element ``offset``."""

    def download(self, buf: Buffer) -> np.ndarray[Any, Any]:
        """The whole buffer as a host array of its dtype and shape."""

    def download_range(self, buf: Buffer, offset: int, count: int) -> np.ndarray[Any, Any]:
        """Elements ``[offset, offset + count)`` of the flattened buffer as a 1-D host array
        (already checked against the buffer's size): a chunk of a large buffer is read
        without copying the rest."""

    def fill(self, out: Buffer, value: float) -> None: ...

    def scale(self, x: Buffer, alpha: float, out: Buffer) -> None:
        """out = alpha * x."""

    def axpy(self, alpha: float, x: Buffer, y: Buffer) -> None:
        """y = alpha * x + y."""

    def sum(self, x: Buffer) -> float: ...

    def sgemm(self, a: Buffer, b: Buffer, c: Buffer, alpha: float, beta: float) -> None:
        """c = alpha * a @ b + beta * c, float32 row-major; shapes (m,k), (k,n), (m,n)."""

    def fault(self) -> None:
        """Break the context the way an illegal memory access does; raises DevicePoisoned."""


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
    if name not in ("pycuda", "sim"):
        raise ConfigError(f"unknown backend {name!r}; use auto, pycuda or sim")
    return name


def create_backend(name: str, *, node: str, gpu_index: int, sim_memory_bytes: int) -> Backend:
    """A closed backend of kind ``name`` (``pycuda`` or ``sim``) for one pinned GPU."""
    if name == "sim":
        from workers.sim import SimBackend

        return SimBackend(node=node, gpu_index=gpu_index, capacity_bytes=sim_memory_bytes)
    if name == "pycuda":
        from workers.cuda import CudaBackend

        return CudaBackend(gpu_index=gpu_index)
    raise ConfigError(f"unknown backend {name!r}")
