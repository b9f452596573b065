"""A request as it sits in a shard queue's Redis list: Celery's protocol-2 JSON envelope.

``apply_async`` builds this through Celery and kombu; :mod:`gpu_tasks.submit.bulk` and
``gpu-tasks batch`` build it here from a per-task template, field for field what
``apply_async`` would send (``docs/PROTOCOL.md`` describes every field), so a worker
cannot tell them apart. Building one costs a JSON dump of the arguments, a base64
and a string format: a few microseconds, against about 300 for ``apply_async``.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from celery.utils.nodenames import anon_nodename
from celery.utils.saferepr import saferepr

from gpu_tasks.errors import RoutingError

_EMBED = b', {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'
_b64 = base64.b64encode
_dumps = json.dumps
_json_string = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


def plain_kwargs(kwargs: Any) -> bool:
    """Whether ``repr(kwargs)`` is short and is what Celery's saferepr would print: a dict
    of short scalars and short lists of scalars (the common request)."""
    if type(kwargs) is not dict or len(kwargs) > 16:
        return False
    for key, value in kwargs.items():
        if type(key) is not str or len(key) > 64:
            return False
        kind = type(value)
        if kind is str:
            if len(value) > 256:
                return False
        elif kind is list or kind is tuple:
            if len(value) > 16 or any(type(v) not in _SCALARS or
                                      (type(v) is str and len(v) > 64) for v in value):
                return False
        elif kind not in _SCALARS:
            return False
    return True


_SCALARS = (str, int, float, bool, type(None))


def kwargs_repr(kwargs: dict[str, Any], json_bytes: int | None = None) -> str:
    """The ``kwargsrepr`` header (what logs and Flower show): Celery's saferepr, capped at
    1 KiB, or plain ``repr`` where that is short and 40 us cheaper: plain arguments, or
    any whose JSON text (``json_bytes`` long) is short."""
    if (json_bytes is not None and json_bytes <= 512) or plain_kwargs(kwargs):
        return repr(kwargs)
    return str(saferepr(kwargs, 1024, maxlevels=3))


def new_task_ids(count: int) -> list[str]:
    """``count`` random version-4 UUIDs as Celery writes task ids, from one urandom call."""
    h = os.urandom(16 * count).hex()
    # Version 4 and the RFC 4122 variant, as uuid.uuid4() sets them.
    return [f"{h[i:i + 8]}-{h[i + 8:i + 12]}-4{h[i + 13:i + 16]}-"
            f"{_VARIANT[h[i + 16]]}{h[i + 17:i + 20]}-{h[i + 20:i + 32]}"
            for i in range(0, 32 * count, 32)]


_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


@dataclass(frozen=True)
class TaskTemplate:
    """What every request for one task shares; :meth:`payload` fills in the rest."""

    name: str
    time_limit: float | None
    soft_time_limit: float | None
    reply_to: str
    origin: str

    def __post_init__(self) -> None:
        # The envelope with the per-request fields left as %s: the body, the id (as id,
        # root_id and correlation_id), kwargsrepr, the queue and the delivery tag.
        def fixed(value: Any) -> str:
            return _dumps(value).replace("%", "%%")

        text = (
            '{"body": "%s", "content-encoding": "utf-8", "content-type": "application/json", '
            '"headers": {"lang": "py", "task": ' + fixed(self.name) + ', "id": "%s", '
            '"shadow": null, "eta": null, "expires": null, "group": null, "group_index": null, '
            '"retries": 0, "timelimit": ' + fixed([self.time_limit, self.soft_time_limit])
            + ', "root_id": "%s", "parent_id": null, "argsrepr": "()", "kwargsrepr": %s, '
            '"origin": ' + fixed(self.origin) + ', "ignore_result": false, '
            '"replaced_task_nesting": 0, "stamped_headers": null, "stamps": {}}, '
            '"properties": {"correlation_id": "%s", "reply_to": ' + fixed(self.reply_to)
            + ', "delivery_mode": 2, "delivery_info": {"exchange": "", "routing_key": "%s"}, '
            '"priority": 0, "body_encoding": "base64", "delivery_tag": "%s"}}'
        )
        object.__setattr__(self, "_text", text.encode())

    @classmethod
    def for_task(cls, app: Any, name: str) -> TaskTemplate:
        """The template of task ``name`` as ``app`` would send it (its time limits)."""
        task = app.tasks.get(name)
        if task is None:
            raise RoutingError(f"unknown task {name!r}: not defined in this producer "
                               "(import the module that defines it); nothing was enqueued")
        return cls(name=name, time_limit=task.time_limit, soft_time_limit=task.soft_time_limit,
                   reply_to=app.thread_oid, origin=anon_nodename())

    def payload(self, kwargs_json: bytes, kwargs: dict[str, Any], task_id: bytes,
                queue: bytes, delivery_tag: bytes) -> bytes:
        """The message for one request, as ``LPUSH <queue> <payload>`` stores it (UTF-8).

        ``kwargs_json`` is ``json.dumps(kwargs).encode()`` (callers that validated the
        request already have it)."""
        body = _b64(b"[[], " + kwargs_json + _EMBED)
        shown = _json_string(kwargs_repr(kwargs, len(kwargs_json))).encode()
        return self._text % (  # type: ignore[attr-defined, no-any-return]
            body, task_id, task_id, shown, task_id, queue, delivery_tag)


def decode(payload: str | bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(headers, kwargs)`` of a stored message (for tests and tools)."""
    message: Mapping[str, Any] = json.loads(payload)
    _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    return dict(message["headers"]), kwargs
