"""Host values into a buffer's dtype, refusing what the dtype cannot hold.

numpy's own casting stores ``1e20`` into int32 as -2147483648, ``300`` into uint8 as 44
and ``1.5`` into int64 as 1, without a word: silent wrong data. Here a value goes in
only if the dtype holds it — an integer dtype takes integers (and integral floats) in
its range, a float dtype takes anything that does not overflow it to infinity (NaN and
infinity themselves are float values) — and otherwise the request fails with
:class:`~gpu_tasks.errors.BadRequest` naming the field and the first bad index. A caller
who wants numpy's casting asks for it with ``cast="unsafe"``.

The checks are vectorised (one ``np.asarray`` and a few whole-array comparisons), so a
write of a million values costs about what the conversion alone costs. Python ints too
large for numpy's 64-bit types take an exact element-by-element path instead of raising
``OverflowError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gpu_tasks.errors import BadRequest, shown

CASTS = ("safe", "unsafe")
"""``cast=`` values: ``safe`` refuses values the dtype cannot hold, ``unsafe`` is numpy's
``astype(casting="unsafe")`` (out-of-range integers wrap, NaN into an integer is whatever
the platform makes of it)."""

_EXACT_FLOAT = 1 << 53
"""Beyond this a float64 no longer holds every integer: where ints were mixed with
floats, numpy's float64 array may have rounded them, so they are checked exactly."""


def parse_cast(cast: object) -> str:
    """``cast`` if it is one of :data:`CASTS`, else :class:`BadRequest` naming ``cast``."""
    if not isinstance(cast, str) or cast not in CASTS:
        raise BadRequest(f"cast must be one of {', '.join(map(repr, CASTS))}, got {cast!r}",
                         "cast")
    return cast


def _value_shown(value: object) -> str:
    return shown(value.item() if isinstance(value, np.generic) else value, limit=40)


def _refuse(label: str, value: object, dtype: np.dtype[Any], field: str) -> BadRequest:
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        holds = f"integers from {info.min} to {info.max}"
    else:
        holds = f"values up to {float(np.finfo(dtype).max):g} in magnitude"
    return BadRequest(
        f"{label} = {_value_shown(value)} cannot be stored in {dtype.name} (it holds {holds}); "
        "pass cast='unsafe' to store numpy's cast of it instead",
        field,
    )


def _number_list(values: Sequence[Any], field: str) -> None:
    """Every element an int or a float (not a bool: JSON true is not a number here)."""
    # One C-level pass over the types; the index is looked for only when one is wrong.
    if set(map(type, values)) <= {int, float}:
        return
    for i, v in enumerate(values):
        if type(v) not in (int, float):
            raise BadRequest(
                f"{field}[{i}] = {_value_shown(v)} is not a number; {field} must be a flat list of "
                "numbers",
                field,
            )


def _first(bad: np.ndarray[Any, Any]) -> int | None:
    if not bad.any():
        return None
    return int(np.argmax(bad))


def _exact(values: Sequence[Any], dtype: np.dtype[Any], cast: str,
           label: Callable[[int], str], field: str) -> np.ndarray[Any, Any]:
    """Element by element, on Python numbers: for ints numpy cannot hold in 64 bits (and
    large ints mixed with floats). Never raises ``OverflowError``."""
    out = np.empty(len(values), dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        span = 1 << (8 * dtype.itemsize)
        for i, v in enumerate(values):
            if isinstance(v, float) and not (math.isfinite(v) and v.is_integer()):
                if cast == "safe":
                    raise _refuse(label(i), v, dtype, field)
                with np.errstate(all="ignore"):
                    out[i] = np.float64(v).astype(dtype)
                continue
            n = int(v)
            if not info.min <= n <= info.max:
                if cast == "safe":
                    raise _refuse(label(i), v, dtype, field)
                n = (n - info.min) % span + info.min  # two's complement wrap, as numpy's cast
            out[i] = n
        return out
    with np.errstate(all="ignore"):
        for i, v in enumerate(values):
            try:
                as_float = float(v)
            except OverflowError:  # an int beyond float64
                if cast == "safe":
                    raise _refuse(label(i), v, dtype, field) from None
                as_float = math.inf if v > 0 else -math.inf
            item = np.float64(as_float).astype(dtype)
            if cast == "safe" and math.isfinite(as_float) and not np.isfinite(item):
                raise _refuse(label(i), v, dtype, field)
            out[i] = item
    return out


def to_dtype(values: Sequence[Any] | np.ndarray[Any, Any], dtype: np.dtype[Any],
             field: str = "values", cast: str = "safe",
             label: Callable[[int], str] | None = None) -> np.ndarray[Any, Any]:
    """``values`` (a flat list of Python numbers, or a numpy array) as a contiguous 1-D
    array of ``dtype``; :class:`BadRequest` naming ``field`` and the first element the
    dtype cannot hold, unless ``cast == "unsafe"``."""
    name_of = label or (lambda i: f"{field}[{i}]")
    if isinstance(values, np.ndarray):
        arr: np.ndarray[Any, Any] | None = values.reshape(-1)
        if values.dtype.kind not in "biuf":
            raise BadRequest(f"{field} must be numbers, got an array of {values.dtype}", field)
        items: Sequence[Any] = arr  # type: ignore[assignment]
    else:
        _number_list(values, field)
        items = values
        try:
            arr = np.asarray(values) if len(values) else np.empty(0, dtype)
        except (OverflowError, ValueError):
            arr = None
        if arr is not None and arr.dtype.kind not in "iuf":
            arr = None  # object: some int needs more than 64 bits
        if arr is None:
            return _exact(values, dtype, cast, name_of, field)
    assert arr is not None
    if arr.dtype == dtype:
        return np.ascontiguousarray(arr)
    if cast == "unsafe":
        with np.errstate(all="ignore"):
            return np.ascontiguousarray(arr.astype(dtype, casting="unsafe"))
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if arr.dtype.kind == "f" and not isinstance(values, np.ndarray) and (
                np.abs(arr) >= _EXACT_FLOAT).any():
            # ints mixed with floats became float64, rounded where they are this large
            return _exact(values, dtype, cast, name_of, field)
        if arr.dtype.kind == "f":
            with np.errstate(invalid="ignore"):
                # hi + 1 is a power of two, exact in float64 (float(hi) of int64 is not)
                bad = ~np.isfinite(arr) | (arr != np.trunc(arr)) | (arr < info.min) | (
                    arr >= float(info.max + 1))
        else:
            bad = (arr < info.min) | (arr > info.max)
        index = _first(bad)
        if index is not None:
            raise _refuse(name_of(index), items[index], dtype, field)
        return np.ascontiguousarray(arr.astype(dtype))
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(dtype)
    if arr.dtype.kind != "f" or arr.dtype.itemsize > dtype.itemsize:
        bad = ~np.isfinite(out) if arr.dtype.kind != "f" else np.isfinite(arr) & ~np.isfinite(out)
        index = _first(bad)
        if index is not None:
            raise _refuse(name_of(index), items[index], dtype, field)
    return np.ascontiguousarray(out)


def to_scalar(value: object, dtype: np.dtype[Any], field: str, cast: str = "safe") -> Any:
    """A kernel's scalar parameter as a numpy scalar of ``dtype`` (the buffer's), or
    :class:`BadRequest` naming ``field`` if the dtype cannot hold it: ``fill`` of 300 into
    uint8, ``scale`` of an int32 buffer by 1.5."""
    return to_dtype([value], dtype, field, cast, label=lambda _: field)[0]
