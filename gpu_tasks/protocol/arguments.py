"""A request's arguments checked against its task's signature, on both sides.

Python's ``TypeError`` from binding names the offending field only in its text; producers
(at submit time) and GPU workers (before a body runs) answer the same
:class:`~gpu_tasks.errors.BadArguments` naming it instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from gpu_tasks.errors import BadArguments

_QUOTED = re.compile(r"'([^']+)'")


def bad_arguments(exc: TypeError, suffix: str = "") -> BadArguments:
    """The :class:`BadArguments` for a binding ``TypeError``, naming the field it quotes."""
    match = _QUOTED.search(str(exc))
    return BadArguments(f"bad arguments: {exc}{suffix}", match.group(1) if match else None)


def checked_arguments(check: Callable[..., Any]) -> Callable[..., Any]:
    """Celery's submit-time check of a call's arguments (``Task.__header__``, made by
    ``GpuCelery.type_checker``), raising :class:`BadArguments` naming the field where it
    raises a bare ``TypeError``."""

    def checked(*args: Any, **kwargs: Any) -> Any:
        try:
            return check(*args, **kwargs)
        except TypeError as exc:
            raise bad_arguments(exc, "; nothing was enqueued") from None

    return checked


def check_shapes(name: str, args: Any, kwargs: Any) -> None:
    """Refuse ``args`` that are not a list or tuple and ``kwargs`` that are not a mapping
    (``apply_async(kwargs=[1, 2])``), naming the field, before anything is built from them:
    Celery itself fails there with a bare ``TypeError`` (or, through ``send_task``, sends a
    message no worker can run)."""
    if args is not None and not isinstance(args, list | tuple):
        raise BadArguments(f"bad arguments: {name}: args must be a list, got "
                           f"{type(args).__name__}; nothing was enqueued", "args")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise BadArguments(f"bad arguments: {name}: kwargs must be an object (a dict) of "
                           f"keyword arguments, got {type(kwargs).__name__}; nothing was "
                           "enqueued", "kwargs")
