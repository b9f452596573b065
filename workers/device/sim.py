"""``sim``: a GPU simulated with numpy, for hosts without one.

It has a fixed capacity (``GPU_TASKS_SIM_MEMORY``) and the same accounting and
errors as a real device, so everything above the backend runs unchanged. Device
memory is a byte array per allocation; kernels are the numpy equivalents of the
CUDA kernels in :mod:`workers.device.cuda`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpu_tasks.errors import OutOfMemory
from workers.device.base import Buffer, DeviceInfo, DevicePoisoned


class SimBackend:
    """A simulated GPU with ``capacity_bytes`` of memory."""

    def __init__(self, *, node: str, gpu_index: int, capacity_bytes: int) -> None:
        self.info = DeviceInfo(
            backend="sim",
            name="gpu-tasks simulated GPU",
            uuid=f"SIM-{node}-{gpu_index}",
            total_bytes=capacity_bytes,
        )
        self._used = 0
        self._open = False
        self._live: dict[int, tuple[np.ndarray[Any, Any], int]] = {}

    def open(self) -> None:
        self._used = 0
        self._live = {}
        self._open = True

    def close(self) -> None:
        self._live.clear()
        self._used = 0
        self._open = False

    def mem_info(self) -> tuple[int, int]:
        self._check_open()  # as the driver does on a poisoned context
        return self.info.total_bytes - self._used, self.info.total_bytes

    def alloc(self, nbytes: int) -> np.ndarray[Any, Any]:
        self._check_open()
        free = self.info.total_bytes - self._used
        if nbytes > free:
            raise OutOfMemory(
                f"cannot allocate {nbytes} bytes: {free} of {self.info.total_bytes} bytes free "
                f"on {self.info.uuid}",
                nbytes,
                free,
            )
        memory = np.zeros(max(nbytes, 1), dtype=np.uint8)  # calloc: pages appear on first write
        self._live[id(memory)] = (memory, nbytes)
        self._used += nbytes
        return memory

    def release(self, allocation: Any) -> None:
        entry = self._live.pop(id(allocation), None)
        if entry is not None:
            self._used -= entry[1]

    def upload(self, buf: Buffer, host: np.ndarray[Any, Any], offset: int) -> None:
        self._view(buf).reshape(-1)[offset : offset + host.size] = host

    def download(self, buf: Buffer) -> np.ndarray[Any, Any]:
        return self._view(buf).copy()

    def download_range(self, buf: Buffer, offset: int, count: int) -> np.ndarray[Any, Any]:
        return self._view(buf).reshape(-1)[offset : offset + count].copy()

    def fill(self, out: Buffer, value: float) -> None:
        self._view(out)[...] = value

    def scale(self, x: Buffer, alpha: float, out: Buffer) -> None:
        xv = self._view(x)
        self._view(out)[...] = (xv * xv.dtype.type(alpha)).astype(out.dtype, copy=False)

    def axpy(self, alpha: float, x: Buffer, y: Buffer) -> None:
        yv = self._view(y)
        yv += self._view(x) * yv.dtype.type(alpha)

    def sum(self, x: Buffer) -> float:
        xv = self._view(x)
        return float(xv.sum(dtype=xv.dtype))

    def sgemm(self, a: Buffer, b: Buffer, c: Buffer, alpha: float, beta: float) -> None:
        cv = self._view(c)
        f32 = np.float32
        cv[...] = f32(alpha) * (self._view(a) @ self._view(b)) + f32(beta) * cv

    def fault(self) -> None:
        self._open = False
        raise DevicePoisoned("simulated illegal memory access; the context is unusable")

    def _check_open(self) -> None:
        if not self._open:
            raise DevicePoisoned("the simulated context is closed or poisoned")

    def _view(self, buf: Buffer) -> np.ndarray[Any, Any]:
        self._check_open()
        memory: np.ndarray[Any, Any] = buf.allocation
        return memory[: buf.nbytes].view(buf.dtype).reshape(buf.shape)
