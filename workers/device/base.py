"""The device backend interface: what every backend (``sim``, ``pycuda``) provides.

A backend owns one device context in one process (a worker's pool child) and
does the device work: allocate, copy, run kernels. Bookkeeping (which entity owns
what, quotas, generations) lives above it in :mod:`workers.device.store`, so ``sim`` and
``pycuda`` differ only in where the bytes live and who does the arithmetic.

Kernel arguments reach a backend already checked by :mod:`workers.device.kernels`
(dtypes supported, shapes compatible), so backends only compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

# dtypes every backend stores; kernels narrow this further (see workers.device.kernels).
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
