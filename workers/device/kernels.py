"""The named kernels ``gpu_tasks.run`` can launch, and the checks on their arguments.

Each kernel names its buffer and scalar parameters; :func:`launch` checks them
(buffers exist, dtypes supported, shapes compatible, scalars finite) and raises
:class:`BadRequest` naming the first wrong field, before the backend computes.
The math lives in the backends: CUDA in :mod:`workers.device.cuda`, numpy in
:mod:`workers.device.sim`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gpu_tasks.errors import BadRequest
from workers.device import values
from workers.device.base import Backend, Buffer
from workers.device.store import BufferStore, parse_name

ARITHMETIC = ("float32", "float64", "int32", "int64")
_MAX_SGEMM_DIM = (1 << 31) - 1
FILLABLE = (*ARITHMETIC, "uint8")


@dataclass(frozen=True)
class Kernel:
    name: str
    buffers: tuple[str, ...]
    """Required buffer-name parameters."""
    scalars: Mapping[str, float | None] = field(default_factory=dict)
    """Scalar parameters and their defaults (None: required)."""
    optional_buffers: tuple[str, ...] = ()
    body: Callable[[Backend, dict[str, Buffer], dict[str, Any]], dict[str, Any]] = lambda *_: {}
    doc: str = ""
    typed_by: Mapping[str, str] = field(default_factory=dict)
    """Scalar -> the buffer parameter whose dtype it is stored in for the computation: the
    scalar must be a value of that dtype (300 is no uint8, 1.5 no int32), unless
    ``cast="unsafe"``."""


def _same_shape(bufs: dict[str, Buffer], first: str, second: str) -> None:
    a, b = bufs[first], bufs[second]
    if a.dtype != b.dtype:
        raise BadRequest(
            f"{second} is {b.dtype.name} but {first} is {a.dtype.name}; they must match", second
        )
    if a.size != b.size:
        raise BadRequest(f"{second} has {b.size} elements but {first} has {a.size}", second)


def _dtype_in(bufs: dict[str, Buffer], param: str, allowed: tuple[str, ...]) -> None:
    if bufs[param].dtype.name not in allowed:
        raise BadRequest(
            f"{param} is {bufs[param].dtype.name}; this kernel takes {', '.join(allowed)}", param
        )


def _fill(be: Backend, b: dict[str, Buffer], s: dict[str, Any]) -> dict[str, Any]:
    _dtype_in(b, "out", FILLABLE)
    be.fill(b["out"], s["value"])
    return {"outputs": ["out"]}


def _scale(be: Backend, b: dict[str, Buffer], s: dict[str, Any]) -> dict[str, Any]:
    b.setdefault("out", b["x"])
    _dtype_in(b, "x", ARITHMETIC)
    _same_shape(b, "x", "out")
    be.scale(b["x"], s["alpha"], b["out"])
    return {"outputs": ["out"]}


def _axpy(be: Backend, b: dict[str, Buffer], s: dict[str, Any]) -> dict[str, Any]:
    _dtype_in(b, "x", ARITHMETIC)
    _same_shape(b, "x", "y")
    be.axpy(s["alpha"], b["x"], b["y"])
    return {"outputs": ["y"]}


def _sum(be: Backend, b: dict[str, Buffer], s: dict[str, Any]) -> dict[str, Any]:
    _dtype_in(b, "x", ARITHMETIC)
    value = be.sum(b["x"])
    return {"outputs": [], "value": int(value) if b["x"].dtype.kind == "i" else value}


def _sgemm(be: Backend, b: dict[str, Buffer], s: dict[str, Any]) -> dict[str, Any]:
    for param in ("a", "b", "c"):
        _dtype_in(b, param, ("float32",))
        if len(b[param].shape) != 2:
            raise BadRequest(
                f"{param} must be a 2-D matrix, has shape {list(b[param].shape)}", param
            )
    (m, k), (k2, n), (m2, n2) = b["a"].shape, b["b"].shape, b["c"].shape
    for param, dims in (("a", (m, k)), ("b", (k2, n))):
        if max(dims) > _MAX_SGEMM_DIM:  # the kernel indexes rows and columns with int32
            raise BadRequest(f"{param} has shape {list(dims)}; sgemm takes dimensions up to "
                             f"{_MAX_SGEMM_DIM}", param)
    if k2 != k:
        raise BadRequest(f"b has {k2} rows but a has {k} columns", "b")
    if (m2, n2) != (m, n):
        raise BadRequest(f"c has shape [{m2}, {n2}]; a @ b has shape [{m}, {n}]", "c")
    be.sgemm(b["a"], b["b"], b["c"], s["alpha"], s["beta"])
    return {"outputs": ["c"]}


def _fault(be: Backend, b: dict[str, Buffer], s: dict[str, Any]) -> dict[str, Any]:
    be.fault()
    return {"outputs": []}


KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in (
        Kernel("fill", ("out",), {"value": None}, body=_fill, doc="out[:] = value",
               typed_by={"value": "out"}),
        Kernel(
            "scale",
            ("x",),
            {"alpha": None},
            ("out",),
            _scale,
            "out = alpha * x (out defaults to x)",
            {"alpha": "x"},
        ),
        Kernel("axpy", ("x", "y"), {"alpha": 1.0}, body=_axpy, doc="y = alpha * x + y",
               typed_by={"alpha": "y"}),
        Kernel("sum", ("x",), body=_sum, doc="value = sum(x)"),
        Kernel(
            "sgemm",
            ("a", "b", "c"),
            {"alpha": 1.0, "beta": 0.0},
            body=_sgemm,
            doc="c = alpha * a @ b + beta * c (float32, row-major)",
            typed_by={"alpha": "c", "beta": "c"},
        ),
        Kernel(
            "fault",
            (),
            body=_fault,
            doc="break the context like an illegal memory access (tests recovery)",
        ),
    )
}


def _scalar(name: str, value: object) -> int | float:
    """A finite number, kept as the Python int or float it came as: an int is never rounded
    through a float on its way to an integer buffer."""
    if type(value) is int:
        return value  # math.isfinite would raise OverflowError beyond float64's range
    if type(value) is not float or not math.isfinite(value):
        raise BadRequest(f"{name} must be a finite number, got {value!r}", name)
    return value


def launch(
    store: BufferStore,
    entity_id: str,
    kernel: object,
    params: Mapping[str, Any],
    generation: int | None = None,
    *,
    allow_fault: bool = False,
    cast: object = "safe",
) -> dict[str, Any]:
    """Check ``params`` against the kernel and run it on the entity's buffers; scalars
    must be values of the dtype they are computed in (see :mod:`workers.device.values`) unless
    ``cast="unsafe"``."""
    casting = values.parse_cast(cast)
    if not isinstance(kernel, str) or kernel not in KERNELS:
        raise BadRequest(
            f"kernel must be one of {', '.join(sorted(KERNELS))}, got {kernel!r}", "kernel"
        )
    spec = KERNELS[kernel]
    if kernel == "fault" and not allow_fault:
        raise BadRequest(
            "kernel fault breaks the GPU context for every entity on it; it runs only "
            "where GPU_TASKS_FAULT_INJECTION=1",
            "kernel",
        )
    known = {*spec.buffers, *spec.optional_buffers, *spec.scalars}
    for param in params:
        if param not in known:
            raise BadRequest(
                f"kernel {kernel} has no parameter {param!r} "
                f"(it takes: {', '.join(sorted(known)) or 'none'})",
                param,
            )
    bufs: dict[str, Buffer] = {}
    for param in (*spec.buffers, *spec.optional_buffers):
        if param not in params:
            if param in spec.optional_buffers:
                continue
            raise BadRequest(f"kernel {kernel} needs buffer parameter {param!r}", param)
        bufs[param] = store.get(entity_id, parse_name(params[param], param), generation)
    scalars: dict[str, Any] = {}
    for param, default in spec.scalars.items():
        if param in params:
            scalars[param] = _scalar(param, params[param])
        elif default is None:
            raise BadRequest(f"kernel {kernel} needs scalar parameter {param!r}", param)
        else:
            scalars[param] = default
    for param, typed_by in spec.typed_by.items():
        buf = bufs.get(typed_by)
        if buf is not None:
            scalars[param] = values.to_scalar(scalars[param], buf.dtype, param, casting)
    result = spec.body(store.backend, bufs, scalars)
    # Bodies name their output parameters; callers want buffer names (scale's out
    # defaults to x inside its body, so read them from ``bufs`` after it ran).
    result["outputs"] = [bufs[p].name for p in result["outputs"]]
    return {"kernel": kernel, **result}
