"""Celery messages built by hand, as a producer in another language or a raw ``LPUSH``
would send them: what fencing must cope with whatever the router would have done."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any


def raw_task_message(name: str, kwargs: dict[str, Any], queue: str,
                     task_id: str | None = None) -> tuple[str, str]:
    """``(task id, payload)``: a Celery protocol-2 JSON message for ``queue`` as kombu's
    Redis transport stores it in the queue's list (``LPUSH queue payload``)."""
    task_id = task_id or str(uuid.uuid4())
    body = [[], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    payload = {
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py", "task": name, "id": task_id, "shadow": None, "eta": None,
            "expires": None, "group": None, "group_index": None, "retries": 0,
            "timelimit": [None, None], "root_id": task_id, "parent_id": None,
            "argsrepr": "()", "kwargsrepr": repr(kwargs), "origin": "tests",
            "ignore_result": False,
        },
        "properties": {
            "correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
            "delivery_info": {"exchange": queue, "routing_key": queue}, "priority": 0,
            "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
        },
    }
    return task_id, json.dumps(payload)
