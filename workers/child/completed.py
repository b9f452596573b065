"""What a pool child has completed: a redelivered copy of a request it ran is answered
from here, not run again.

Redis hands a request to a worker again whenever it cannot know that the first delivery
finished: the worker lost its broker connection while the request ran (kombu puts the
channel's unacknowledged messages back when it closes it), or the result could not be
stored and the message was never acknowledged. A producer sends one twice when its
publish to a hung Redis timed out and was retried, though Redis had taken the first.
The fence (:mod:`workers.consumer.fence`) skips a redelivered request whose result is already in
Redis; a copy fetched while the first delivery still ran, one whose result never reached
Redis, and a producer's second copy (not marked redelivered) reach the pool child, and
only the child knows it ran there. Running ``scale`` or ``axpy`` twice would
silently double what it did, so the child keeps the results of the requests it
completed last and answers a second copy with the same result.

A result too large to keep cheaply (a big ``read``) is not kept: running a read again
changes nothing. A user's task with a large result is run again, with a warning. (Every
mechanism that keeps a request from running twice is listed in :mod:`workers`.)
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

KEPT_REQUESTS = 256
"""How many completed requests a pool child remembers (the most recent)."""
KEPT_RESULT_CHARS = 64 << 10
"""Largest result kept, in characters of its strings (plus 8 per other value): at most
``KEPT_REQUESTS`` times this, 16 MiB, per pool child."""

MISSING = object()
"""What :meth:`Completed.result` answers for a request this child did not complete."""


class Completed:
    """The results of the last :data:`KEPT_REQUESTS` requests this pool child ran."""

    def __init__(self, kept: int = KEPT_REQUESTS, max_chars: int = KEPT_RESULT_CHARS) -> None:
        self._results: OrderedDict[str, Any] = OrderedDict()
        self._kept = kept
        self._max_chars = max_chars

    def __len__(self) -> int:
        return len(self._results)

    def remember(self, task_id: str | None, result: Any) -> None:
        if not task_id or not fits(result, self._max_chars):
            return
        self._results[task_id] = result
        self._results.move_to_end(task_id)
        while len(self._results) > self._kept:
            self._results.popitem(last=False)

    def result(self, task_id: str | None) -> Any:
        """The result ``task_id`` completed with here, or :data:`MISSING`."""
        if not task_id:
            return MISSING
        return self._results.get(task_id, MISSING)

    def clear(self) -> None:
        self._results.clear()


def fits(value: Any, budget: int) -> bool:
    """Whether ``value`` (JSON-like) holds at most ``budget`` characters; stops walking as
    soon as it does not, so a large result costs no more than a small one."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (str, bytes)):
            budget -= len(item)
        elif isinstance(item, (dict, list, tuple)):
            budget -= 8 * len(item)
            if budget >= 0:  # checked first: a long list is refused without walking it
                stack.extend(item.items() if isinstance(item, dict) else item)
        else:
            budget -= 8
        if budget < 0:
            return False
    return True
