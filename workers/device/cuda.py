"""``pycuda``: the device backend for real NVIDIA GPUs.

Imported only in a GPU worker's pool child, after the parent pinned it with
``CUDA_VISIBLE_DEVICES``, so its one device is CUDA ordinal 0. PyCUDA is imported inside
the methods (never ``pycuda.autoinit``): :meth:`CudaBackend.open` makes the context in
the thread that uses it, after checking what would otherwise fail at the first task
(:mod:`workers.device.cuda_checks`), and :meth:`CudaBackend.close` pops it.

Allocations come from PyCUDA's memory pool, so reusing a size costs no driver call;
kernels are compiled on first use and cached for the context's life, and their numpy
twins in :mod:`workers.device.sim` define what they compute. A full device is
:class:`~gpu_tasks.errors.OutOfMemory`; a sticky driver error (an illegal address, a
failed launch) leaves the context unusable, so it is
:class:`~workers.device.base.DevicePoisoned` and the runtime ends the pool child (CUDA:
"the process must be terminated and relaunched"); any other driver or compiler error
is a :class:`~gpu_tasks.errors.DeviceError` naming the operation. Device objects are
finalised on the task thread only (:attr:`CudaBackend.collects_garbage`).
"""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import numpy as np

from gpu_tasks.errors import BadRequest, ConfigError, DeviceError, OutOfMemory
from workers.device.base import Buffer, DeviceInfo, DevicePoisoned
from workers.device.cuda_checks import (
    cuda_version,
    normalize_pci_bus_id,
    nvcc_version,
    physical_gpu_uuid,
    require_nvcc,
    sticky_error,
    version_problems,
)

FILL_DTYPES = ("float32", "float64", "int32", "int64", "uint8")
ARITHMETIC_DTYPES = ("float32", "float64", "int32", "int64")

_TILE = 16
_MAX_GRID_Y = 65535

# c = alpha * a @ b + beta * c for row-major float32 a (m,k), b (k,n), c (m,n).
# Each 16x16 block computes one tile of c, staging tiles of a and b through
# shared memory; out-of-range elements load as 0 so any m, n, k >= 1 works.
_SGEMM_SOURCE = r"""
#define TILE 16

__global__ void gt_sgemm(const float * __restrict__ a, const float * __restrict__ b,
                         float *c, int m, int n, int k, float alpha, float beta)
{
    __shared__ float a_tile[TILE][TILE];
    __shared__ float b_tile[TILE][TILE];

    const int tx = threadIdx.x, ty = threadIdx.y;
    const int row = blockIdx.y * TILE + ty;
    const int col = blockIdx.x * TILE + tx;
    float acc = 0.0f;

    for (int t = 0; t < k; t += TILE) {
        const int a_col = t + tx;
        const int b_row = t + ty;
        a_tile[ty][tx] = (row < m && a_col < k) ? a[(size_t) row * k + a_col] : 0.0f;
        b_tile[ty][tx] = (b_row < k && col < n) ? b[(size_t) b_row * n + col] : 0.0f;
        __syncthreads();
        #pragma unroll
        for (int j = 0; j < TILE; ++j)
            acc += a_tile[ty][j] * b_tile[j][tx];
        __syncthreads();
    }

    if (row < m && col < n) {
        const size_t at = (size_t) row * n + col;
        c[at] = alpha * acc + beta * c[at];
    }
}
"""

# A store through an unmapped (but aligned) address: CUDA_ERROR_ILLEGAL_ADDRESS,
# which is sticky, exactly like a buggy kernel.
_FAULT_SOURCE = r"""
__global__ void gt_fault(int value)
{
    *((volatile int *) 0x10) = value;
}
"""


def _driver() -> Any:
    """``pycuda.driver``, imported on first use (never at import time of this module)."""
    import pycuda.driver

    return pycuda.driver


def is_sticky(exc: BaseException) -> bool:
    """True when ``exc`` is a PyCUDA error that leaves the context unusable."""
    cuda = _driver()
    if not isinstance(exc, cuda.Error) or isinstance(exc, (cuda.MemoryError, cuda.CompileError)):
        return False
    return sticky_error(str(exc))


class CudaBackend:
    """The CUDA context of one pinned GPU (ordinal 0 in this process).

    ``gpu_index`` is the physical index (as nvidia-smi numbers GPUs); it is
    used only to check that pinning put this process on the intended device.
    """

    def __init__(self, gpu_index: int) -> None:
        self.gpu_index = gpu_index
        # Until open(): nothing is known about the device yet.
        self.info = DeviceInfo(backend="pycuda", name="(context not open)",
                               uuid=f"CUDA-gpu{gpu_index}", total_bytes=0)
        self._ctx: Any = None
        self._pool: Any = None
        self._poisoned = False
        self._live: dict[int, Any] = {}
        self._kernels: dict[tuple[str, ...], Any] = {}

    # -- context ---------------------------------------------------------------

    collects_garbage = True
    """The runtime turns Python's automatic cycle collector off in this process and runs
    it on the task thread instead: a pooled allocation freed from another thread (the
    heartbeat's) throws inside a destructor where the context is not current, which
    aborts the process. Temporaries are freed explicitly for the same reason, and the
    tracebacks of driver errors cleared (:func:`_forget_frames`)."""

    def open(self) -> None:
        """Check the toolkit, make a context on device 0, check it is GPU ``gpu_index`` and
        that the driver can run what PyCUDA and nvcc make, start the memory pool."""
        if self._ctx is not None:
            self.close()
        nvcc = require_nvcc()
        cuda = _driver()
        from pycuda.tools import DeviceMemoryPool

        try:
            cuda.init()
            built = cuda.get_version()
            problems = version_problems(cuda_version(cuda.get_driver_version()),
                                        (int(built[0]), int(built[1])), nvcc_version(nvcc))
            if problems:
                raise ConfigError("; ".join(problems))
            if cuda.Device.count() < 1:
                raise ConfigError("CUDA sees no device in this process; check "
                                  "CUDA_VISIBLE_DEVICES and the driver")
            dev = cuda.Device(0)
            ctx = dev.make_context()
        except cuda.Error as exc:
            raise ConfigError(f"CUDA cannot start in this process (pinned to GPU "
                              f"{self.gpu_index}): {exc}") from exc
        try:
            bus_id = normalize_pci_bus_id(dev.pci_bus_id())
            ctx_bus_id = normalize_pci_bus_id(cuda.Context.get_device().pci_bus_id())
            if ctx_bus_id != bus_id:
                raise ConfigError(f"the new CUDA context is on the device at PCI {ctx_bus_id}, "
                                  f"not on device 0 at PCI {bus_id}")
            uuid = physical_gpu_uuid(self.gpu_index, bus_id)
            pool = DeviceMemoryPool()
        except BaseException:
            with suppress(Exception):
                ctx.pop()
            with suppress(Exception):
                ctx.detach()
            raise
        self._ctx, self._pool = ctx, pool
        self._poisoned = False
        self._live = {}
        self._kernels = {}
        self.info = DeviceInfo(backend="pycuda", name=str(dev.name()),
                               uuid=uuid or f"CUDA-{bus_id}", total_bytes=int(dev.total_memory()))

    def close(self) -> None:
        """Free every allocation and the pool, pop and detach the context.

        Works on a poisoned context too: the driver's complaints while freeing
        are ignored, since destroying the context is what recovers from them.
        """
        ctx, pool, live = self._ctx, self._pool, list(self._live.values())
        self._ctx, self._pool, self._live, self._kernels = None, None, {}, {}
        self._poisoned = False
        if ctx is None:
            return
        cuda = _driver()
        import pycuda.tools

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for allocation in live:
                with suppress(cuda.Error):
                    allocation.free()
            if pool is not None:
                with suppress(cuda.Error):
                    pool.stop_holding()
            with suppress(cuda.Error):
                ctx.pop()
            with suppress(cuda.Error):
                ctx.detach()
            # PyCUDA's own per-context caches hold references to the context.
            pycuda.tools.clear_context_caches()

    def _check_open(self) -> None:
        if self._ctx is None:
            raise DevicePoisoned(f"the CUDA context of GPU {self.gpu_index} is closed")
        if self._poisoned:
            raise DevicePoisoned(f"the CUDA context on {self.info.uuid} is poisoned by an "
                                 "earlier error and must be rebuilt")

    @contextmanager
    def _device(self, what: str) -> Iterator[None]:
        """Run driver work, turning PyCUDA's errors into the backend's.

        Sticky errors mark the context poisoned (so later calls fail fast
        without touching the driver) and raise :class:`DevicePoisoned`.
        """
        self._check_open()
        cuda = _driver()
        try:
            yield
        except (DevicePoisoned, DeviceError):
            raise
        except cuda.MemoryError as exc:
            _forget_frames(exc)
            raise OutOfMemory(f"{what}: the device ran out of memory on {self.info.uuid}: "
                              f"{exc}") from None
        except cuda.Error as exc:
            _forget_frames(exc)
            if is_sticky(exc):
                self._poisoned = True
                raise DevicePoisoned(f"{what} left the CUDA context on {self.info.uuid} "
                                     f"unusable: {exc}") from None
            raise DeviceError(f"{what} failed on {self.info.uuid}: {exc}") from None
        except OSError as exc:  # nvcc vanished after open() checked it
            _forget_frames(exc)
            raise DeviceError(f"{what} failed on {self.info.uuid}: {exc}") from None

    def _sync(self) -> None:
        """Wait for queued work so that its errors surface inside the current task."""
        self._ctx.synchronize()

    # -- memory ----------------------------------------------------------------

    def mem_info(self) -> tuple[int, int]:
        with self._device("mem_info"):
            free, total = _driver().mem_get_info()
        return int(free), int(total)

    def alloc(self, nbytes: int) -> Any:
        """Zeroed pooled device memory of ``nbytes`` (a ``PooledDeviceAllocation``)."""
        cuda = _driver()
        with self._device(f"allocating {nbytes} bytes"):
            free, total = cuda.mem_get_info()
            if nbytes > free:
                # Blocks the pool holds for reuse count as used; give them back and look again.
                self._pool.free_held()
                free, total = cuda.mem_get_info()
            if nbytes > free:
                raise self._out_of_memory(nbytes, int(free), int(total))
            try:
                allocation = self._pool.allocate(max(nbytes, 1))
            except cuda.MemoryError as exc:
                raise self._out_of_memory(nbytes, int(free), int(total)) from exc
            try:
                cuda.memset_d8(int(allocation), 0, max(nbytes, 1))
            except BaseException:
                allocation.free()
                raise
        self._live[id(allocation)] = allocation
        return allocation

    def _out_of_memory(self, nbytes: int, free: int, total: int) -> OutOfMemory:
        return OutOfMemory(f"cannot allocate {nbytes} bytes: {free} of {total} bytes free on "
                           f"{self.info.uuid} ({self.info.name})", nbytes, free)

    def release(self, allocation: Any) -> None:
        """Return ``allocation`` to the pool; unknown ones (an older context's) are ignored."""
        if self._live.pop(id(allocation), None) is None:
            return
        allocation.free()

    def upload(self, buf: Buffer, host: np.ndarray[Any, Any], offset: int) -> None:
        data = np.ascontiguousarray(host, dtype=buf.dtype).reshape(-1)
        if offset < 0 or offset + data.size > buf.size:
            raise BadRequest(f"writing {data.size} elements at offset {offset} overruns buffer "
                             f"{buf.name!r} of {buf.size} elements", "offset")
        if data.size == 0:
            return
        with self._device(f"uploading to buffer {buf.name!r}"):
            _driver().memcpy_htod(int(buf.allocation) + offset * buf.dtype.itemsize, data)

    def download(self, buf: Buffer) -> np.ndarray[Any, Any]:
        out: np.ndarray[Any, Any] = np.empty(buf.shape, buf.dtype)
        if out.size:
            with self._device(f"downloading buffer {buf.name!r}"):
                _driver().memcpy_dtoh(out, int(buf.allocation))
        return out

    def download_range(self, buf: Buffer, offset: int, count: int) -> np.ndarray[Any, Any]:
        out: np.ndarray[Any, Any] = np.empty(count, buf.dtype)
        if count:
            with self._device(f"downloading part of buffer {buf.name!r}"):
                _driver().memcpy_dtoh(out, int(buf.allocation) + offset * buf.dtype.itemsize)
        return out

    # -- kernels ---------------------------------------------------------------

    def fill(self, out: Buffer, value: float) -> None:
        _require(out, FILL_DTYPES, "out")
        if out.size == 0:
            return
        # Cast on the host, the way numpy assigns a float to the sim's array.
        typed = np.array([value]).astype(out.dtype)[0]
        with self._device("fill"):
            knl = self._elementwise("fill", out.dtype, "{t} *out, {t} value", "out[i] = value")
            knl(self._array(out), typed)
            self._sync()

    def scale(self, x: Buffer, alpha: float, out: Buffer) -> None:
        """out = alpha * x, alpha cast to x's dtype (out may be x)."""
        _require(x, ARITHMETIC_DTYPES, "x")
        _require(out, (x.dtype.name,), "out")
        if x.size == 0:
            return
        with self._device("scale"):
            knl = self._elementwise("scale", x.dtype, "{t} *out, const {t} *x, {t} alpha",
                                    "out[i] = alpha * x[i]")
            knl(self._array(out), self._array(x), x.dtype.type(alpha))
            self._sync()

    def axpy(self, alpha: float, x: Buffer, y: Buffer) -> None:
        """y = alpha * x + y, alpha cast to y's dtype."""
        _require(y, ARITHMETIC_DTYPES, "y")
        _require(x, (y.dtype.name,), "x")
        if y.size == 0:
            return
        # Round the product before adding, as numpy does: an FMA would differ in the
        # last bit and a lot more where alpha*x and y nearly cancel.
        product = {"float32": "__fmul_rn(alpha, x[i])",
                   "float64": "__dmul_rn(alpha, x[i])"}.get(y.dtype.name, "alpha * x[i]")
        with self._device("axpy"):
            knl = self._elementwise("axpy", y.dtype, "{t} *y, const {t} *x, {t} alpha",
                                    f"y[i] = {product} + y[i]")
            knl(self._array(y), self._array(x), y.dtype.type(alpha))
            self._sync()

    def sum(self, x: Buffer) -> float:
        """The sum of x, accumulated in x's dtype (integers wrap as in numpy)."""
        _require(x, ARITHMETIC_DTYPES, "x")
        if x.size == 0:
            return 0.0
        with self._device("sum"):
            knl = self._reduction_sum(x.dtype)
            partial = knl(self._array(x))
            try:
                result = partial.get()
            finally:
                partial.gpudata.free()  # back to the pool now, on this thread
        return float(result)

    def sgemm(self, a: Buffer, b: Buffer, c: Buffer, alpha: float, beta: float) -> None:
        """c = alpha * a @ b + beta * c, float32 row-major; shapes (m,k), (k,n), (m,n)."""
        for param, buf in (("a", a), ("b", b), ("c", c)):
            _require(buf, ("float32",), param)
        (m, k), (_, n) = a.shape, b.shape
        grid = ((n + _TILE - 1) // _TILE, (m + _TILE - 1) // _TILE)
        if grid[1] > _MAX_GRID_Y:
            raise BadRequest(f"a has {m} rows; this sgemm takes at most "
                             f"{_MAX_GRID_Y * _TILE}", "a")
        with self._device("sgemm"):
            func = self._source_function("sgemm", _SGEMM_SOURCE, "PPPiiiff")
            func.prepared_call(grid, (_TILE, _TILE, 1), int(a.allocation), int(b.allocation),
                               int(c.allocation), np.int32(m), np.int32(n), np.int32(k),
                               np.float32(alpha), np.float32(beta))
            self._sync()

    def fault(self) -> None:
        """Store through an illegal address, as a buggy kernel would; raises DevicePoisoned."""
        with self._device("compiling the fault kernel"):
            func = self._source_function("fault", _FAULT_SOURCE, "i")
        cuda = _driver()
        try:
            func.prepared_call((1, 1), (1, 1, 1), np.int32(1))
            self._sync()
        except cuda.Error as exc:
            _forget_frames(exc)
            self._poisoned = True
            raise DevicePoisoned(f"deliberate illegal memory access on {self.info.uuid}: {exc}; "
                                 "the context is unusable") from None
        # The driver did not notice (it always does); rebuild anyway, as promised.
        self._poisoned = True
        raise DevicePoisoned(f"deliberate illegal memory access on {self.info.uuid} reported no "
                             "error; the context is treated as unusable")

    # -- kernel cache ----------------------------------------------------------

    def _array(self, buf: Buffer) -> Any:
        """``buf`` as a GPUArray over its own memory (temporaries come from the pool).

        The GPUArray gets the bare device pointer: kernel arguments are packed as
        plain integers, and ``buf`` keeps the allocation alive meanwhile.
        """
        from pycuda.gpuarray import GPUArray

        return GPUArray(buf.shape, buf.dtype, allocator=self._pool.allocate,
                        gpudata=int(buf.allocation))

    def _cached(self, key: tuple[str, ...], build: Callable[[], Any]) -> Any:
        """The kernel under ``key``, built (compiled) on first use in this context."""
        kernel = self._kernels.get(key)
        if kernel is None:
            cuda = _driver()
            try:
                kernel = build()
            except (cuda.CompileError, OSError) as exc:
                raise DeviceError(f"compiling the {key[0]} kernel failed (PyCUDA needs nvcc "
                                  f"on PATH at run time): {exc}") from exc
            self._kernels[key] = kernel
        return kernel

    def _elementwise(self, name: str, dtype: np.dtype[Any], arguments: str,
                     operation: str) -> Any:
        from pycuda.elementwise import ElementwiseKernel
        from pycuda.tools import dtype_to_ctype

        ctype = dtype_to_ctype(dtype)
        return self._cached(
            (name, dtype.name),
            lambda: ElementwiseKernel(arguments.format(t=ctype), operation,
                                      name=f"gt_{name}_{dtype.name}"))

    def _reduction_sum(self, dtype: np.dtype[Any]) -> Any:
        from pycuda.reduction import ReductionKernel
        from pycuda.tools import dtype_to_ctype

        return self._cached(
            ("sum", dtype.name),
            lambda: ReductionKernel(dtype, neutral="0", reduce_expr="a+b", map_expr="in[i]",
                                    arguments=f"const {dtype_to_ctype(dtype)} *in",
                                    name=f"gt_sum_{dtype.name}"))

    def _source_function(self, name: str, source: str, arguments: str) -> Any:
        """Kernel ``gt_<name>`` of CUDA ``source``, prepared for ``arguments`` (PyCUDA's
        struct letters)."""
        def build() -> Any:
            from pycuda.compiler import SourceModule

            func = SourceModule(source).get_function(f"gt_{name}")
            func.prepare(arguments)
            return func

        return self._cached((name,), build)


def _forget_frames(exc: BaseException) -> None:
    """Drop the locals of a driver error's finished frames (temporary GPUArrays among
    them), so no traceback kept for reporting holds device memory, to be freed later by
    whichever thread happens to collect it."""
    traceback.clear_frames(exc.__traceback__)


def _require(buf: Buffer, dtypes: tuple[str, ...], param: str) -> None:
    if buf.dtype.name not in dtypes:
        raise BadRequest(f"{param} is {buf.dtype.name}; this kernel takes {', '.join(dtypes)}",
                         param)
