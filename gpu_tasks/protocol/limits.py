"""How long a request may take and how far ahead it may be scheduled: one rule for the
producer (refused at submit, nothing enqueued) and the GPU worker (a raw producer's
message refused before it runs: dead-lettered, answered).

A GPU worker holds a fetched request unacknowledged while it waits for its eta and while
it runs; past the visibility timeout Redis would hand it to a second worker, which would
run it too. So a time limit, and a delay, must stay under the visibility timeout. A time
limit must be a finite number at least 0 (0, like none, means no limit of the request's
own, as in Celery): Celery reads a negative one as "already past", kills the pool child at
once, and with it every entity's device buffers on that GPU.
"""

from __future__ import annotations

import datetime
import math
from typing import Any

LIMIT_NAMES = ("time_limit", "soft_time_limit")
"""The per-request limits as ``apply_async`` names them, in the order of the wire's
``headers.timelimit``: ``[hard, soft]``."""


def time_limit_problem(name: str, value: Any, visibility_timeout_s: float) -> str:
    """Why ``value`` cannot be the request's ``name`` limit in seconds ('' when it can)."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{name} must be a number of seconds or null, got {value!r}"
    if math.isnan(value) or math.isinf(value):
        return f"{name} must be a finite number of seconds, got {value!r}"
    if value < 0:
        return f"{name} must be at least 0 seconds (0: no limit of its own), got {value!r}"
    if value >= visibility_timeout_s:
        return (f"{name} of {value:g} s reaches past the visibility timeout "
                f"({visibility_timeout_s:g} s, GPU_TASKS_VISIBILITY_TIMEOUT_S), after which "
                "Redis would hand the running request to a second worker")
    return ""


def delay_problem(delay_s: float, visibility_timeout_s: float) -> str:
    """Why a request due ``delay_s`` from now cannot wait in a worker ('' when it can)."""
    if delay_s >= visibility_timeout_s:
        return (f"a delay of {delay_s:.0f} s reaches past the visibility timeout "
                f"({visibility_timeout_s:g} s, GPU_TASKS_VISIBILITY_TIMEOUT_S), after which "
                "Redis would hand the waiting request to a second worker and it would run "
                "twice; schedule it nearer (e.g. from cron or beat)")
    return ""


def seconds_until(when: datetime.datetime) -> float:
    """Seconds from now until ``when`` (naive: UTC, as Celery's eta)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
