"""A request's arguments checked against its task's signature, on both sides.

Python's ``TypeError`` from binding names the offending field only in its text; producers
(at submit time) and GPU workers (before a body runs) answer the same
:class:`~gpu_tasks.errors.BadArguments` naming it instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable
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
