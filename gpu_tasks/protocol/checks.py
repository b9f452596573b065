"""What a GPU worker accepts from a queue: every popped message is checked here before kombu
or Celery decode anything.

Refused: raw bytes that are not a Celery protocol-2 JSON envelope, a content type other
than JSON (pickle, yaml, msgpack never reach a deserializer), a compressed body (never
decompressed: a few MB of gzip can expand to gigabytes), an unknown task, a message over
``max_message_bytes`` or nested deeper than ``max_nesting``, malformed headers. The reason
goes with the message to the dead letters (:mod:`gpu_tasks.control.deadletter`).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

from celery.utils.time import maybe_iso8601

from gpu_tasks.errors import shown
from gpu_tasks.protocol.limits import (
    LIMIT_NAMES,
    delay_problem,
    seconds_until,
    time_limit_problem,
)

CONTENT_TYPE = "application/json"
CONTENT_ENCODINGS = frozenset({"utf-8", "utf8"})
_COUNTED = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')
"""A JSON string (skipped whole, brackets inside it do not count) or a bracket."""


def nesting_depth_exceeds(data: bytes, limit: int) -> bool:
    """Whether the JSON text ``data`` nests arrays and objects deeper than ``limit``.

    Iterative and cheap, before anything recurses over it (a parser, pickle, repr): when
    ``data`` holds no more brackets than ``limit`` it cannot nest deeper (two C-speed
    counts, the usual case); otherwise its brackets are walked outside strings, stopping
    at the first one too deep."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    depth = 0
    for token in _COUNTED.finditer(data):
        char = token.group()[0]
        if char in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif char in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False


def value_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether parsed JSON ``value`` nests lists and dicts deeper than ``limit``; iterative,
    and cheap for an envelope (a few small dicts of scalars, its body a string)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, dict | list):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


def _optional(value: Any, *types: type) -> bool:
    return value is None or isinstance(value, types)


class Checked(NamedTuple):
    """What :func:`check_message` found."""

    payload: Any
    """The envelope as parsed, or None when ``raw`` was not JSON."""
    reason: str
    """Why the message is refused; empty when it is good."""
    body_bytes: bytes = b""
    """The body, base64-decoded (a good message's)."""
    body: Any = None
    """The body as parsed (a good message's ``[args, kwargs, embed]``)."""


def check_message(raw: bytes, *, max_bytes: int, max_nesting: int, tasks: Any = None,
                  loads: Callable[[str], Any] = json.loads,
                  visibility_timeout_s: float = math.inf) -> Checked:
    """Whether ``raw`` is a message a GPU worker may hand to Celery (``reason`` empty), or
    why not. ``tasks``: the registered task names (anything with ``in``), or None to accept
    any name; ``loads``: the JSON parser (the worker passes kombu's, which Celery would
    use, so that the parsed envelope and body are exactly what Celery would get);
    ``visibility_timeout_s``: what time limits and delays must stay under
    (:mod:`gpu_tasks.protocol.limits`).

    Checks only what Celery would otherwise choke on (the worker would die or loop) or
    what must never be decoded; the request's own fields are the task's business."""
    if len(raw) > max_bytes:
        return Checked(None, f"message of {len(raw)} bytes is over the {max_bytes}-byte "
                             "limit (GPU_TASKS_MAX_MESSAGE)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Checked(None, f"message is not UTF-8 text: {exc}")
    try:
        # The C parser guards its own recursion (RecursionError); a deep envelope that parses
        # is caught just below, before anything else recurses over it.
        payload = loads(text)
    except (ValueError, TypeError, RecursionError) as exc:
        return Checked(None, f"message is not JSON: {exc}")
    if not isinstance(payload, dict):
        return Checked(None, f"message is JSON {type(payload).__name__}, not a Celery "
                             "envelope (an object)")
    # The envelope's depth is walked parsed (its body is one string), not counted in the
    # raw bytes, which are mostly that body.
    if value_depth_exceeds(payload, max_nesting):
        return Checked(payload, f"message nests deeper than {max_nesting} levels "
                                "(GPU_TASKS_MAX_NESTING)")
    reason = _envelope_problem(payload, tasks, visibility_timeout_s)
    if reason:
        return Checked(payload, reason)
    try:
        body = base64.b64decode(payload["body"])
    except (binascii.Error, ValueError) as exc:
        return Checked(payload, f"body is not base64: {exc}")
    if nesting_depth_exceeds(body, max_nesting):
        return Checked(payload, f"body nests deeper than {max_nesting} levels "
                                "(GPU_TASKS_MAX_NESTING)")
    try:
        decoded = loads(body.decode("utf-8"))
    except (ValueError, TypeError, RecursionError) as exc:  # UnicodeDecodeError: ValueError
        return Checked(payload, f"body is not UTF-8 JSON: {exc}")
    if not (isinstance(decoded, list) and len(decoded) == 3 and isinstance(decoded[0], list)
            and isinstance(decoded[1], dict) and _optional(decoded[2], dict)):
        return Checked(payload, "body is not a Celery protocol-2 [args, kwargs, embed] list")
    reason = _embed_problem(decoded[2] or {})
    if reason:
        return Checked(payload, reason)
    return Checked(payload, "", body, decoded)


def _embed_problem(embed: dict[str, Any]) -> str:
    """The workflow fields Celery reads after the task ran: a wrong type there fails the
    request with a bare ValueError or TypeError after its work is done."""
    for name in ("callbacks", "errbacks", "chain"):
        value = embed.get(name)
        if not (value is None or (isinstance(value, list)
                                  and all(isinstance(s, dict) for s in value))):
            return f"body embed.{name} {shown(value)} is not a list of signatures or null"
    if not _optional(embed.get("chord"), dict):
        return f"body embed.chord {shown(embed.get('chord'))} is not a signature or null"
    return ""


def _envelope_problem(payload: dict[str, Any], tasks: Any, visibility_timeout_s: float) -> str:
    headers, properties = payload.get("headers"), payload.get("properties")
    if not isinstance(headers, dict):
        return "no headers object (Celery protocol 1 or not Celery)"
    if not isinstance(properties, dict):
        return "no properties object"
    task_id, task = headers.get("id"), headers.get("task")
    if not (isinstance(task_id, str) and task_id):
        return "no headers.id (task id)"
    if not (isinstance(task, str) and task):
        return "no headers.task (task name)"
    if tasks is not None and task not in tasks:
        return f"unknown task {task!r}"
    if not (isinstance(properties.get("delivery_tag"), str) and properties["delivery_tag"]):
        return "no properties.delivery_tag"
    info = properties.get("delivery_info")
    if not (isinstance(info, dict) and isinstance(info.get("exchange"), str)
            and isinstance(info.get("routing_key"), str)):
        return "no properties.delivery_info with exchange and routing_key"
    if properties.get("body_encoding") != "base64":
        return f"body_encoding {properties.get('body_encoding')!r} is not 'base64'"
    if payload.get("content-type") != CONTENT_TYPE:
        return f"content-type {payload.get('content-type')!r} is not {CONTENT_TYPE!r} " \
               "(only JSON is accepted)"
    encoding = payload.get("content-encoding")
    if not (isinstance(encoding, str) and encoding.lower() in CONTENT_ENCODINGS):
        return f"content-encoding {encoding!r} is not 'utf-8'"
    if "compression" in headers:
        return f"compressed body ({headers['compression']!r}): compression is refused"
    if not isinstance(payload.get("body"), str):
        return "body is not a base64 string"
    return _header_problem(headers, visibility_timeout_s)


def _header_problem(headers: dict[str, Any], visibility_timeout_s: float) -> str:
    """Headers Celery's main process parses: a wrong type there raises outside any handler
    and ends the worker; limits and delays a worker cannot honour
    (:mod:`gpu_tasks.protocol.limits`)."""
    limit = headers.get("timelimit")
    if not (limit is None or (isinstance(limit, list | tuple) and len(limit) == 2
                              and all(_optional(t, int, float) and not isinstance(t, bool)
                                      for t in limit))):
        return f"headers.timelimit {limit!r} is not [hard, soft] (numbers or null)"
    for name, value in zip(LIMIT_NAMES, limit or (None, None), strict=True):
        problem = time_limit_problem(name, value, visibility_timeout_s)
        if problem:
            return f"headers.timelimit: {problem}"
    for name in ("eta", "expires"):
        value = headers.get(name)
        if value is None:
            continue
        # Celery reads an empty one as none and then fails on it (the worker dies), and
        # drops one it cannot parse without a word (InvalidTaskError): neither may pass.
        try:
            when = maybe_iso8601(value) if isinstance(value, str) and value else None
        except (ValueError, TypeError, AttributeError, OverflowError):
            when = None
        if when is None:
            return f"headers.{name} {shown(value)} is not an ISO 8601 date or null"
        if name == "eta":
            problem = delay_problem(seconds_until(when), visibility_timeout_s)
            if problem:
                return f"headers.eta: {problem}"
    if not _optional(headers.get("ignore_result"), bool):
        # Celery takes any truthy value for "store no result": a producer that sent junk
        # there would wait for an answer that never comes.
        return f"headers.ignore_result {shown(headers.get('ignore_result'))} is not true, " \
               "false or null"
    stamped = headers.get("stamped_headers")
    if not (stamped is None or (isinstance(stamped, list)
                                and all(isinstance(h, str) for h in stamped))):
        return f"headers.stamped_headers {shown(stamped)} is not a list of names or null"
    if not _optional(headers.get("stamps"), dict):
        return f"headers.stamps {shown(headers.get('stamps'))} is not an object or null"
    for name in ("root_id", "parent_id", "group", "shadow", "lang", "origin", "argsrepr",
                 "kwargsrepr"):
        if not _optional(headers.get(name), str):
            return f"headers.{name} {headers.get(name)!r} is not a string or null"
    for name in ("retries", "group_index"):
        value = headers.get(name)
        if not (value is None or (isinstance(value, int) and not isinstance(value, bool))):
            return f"headers.{name} {value!r} is not an integer or null"
    return ""


_HEADERS = re.compile(rb'"headers"\s*:\s*\{')
_HEADER_ID = re.compile(rb'"id"\s*:\s*"([^"\\]{1,256})"')
_HEADER_TASK = re.compile(rb'"task"\s*:\s*"([^"\\]{1,256})"')


def ids_in_raw(raw: bytes) -> tuple[str | None, str | None]:
    """``(task id, task name)`` read from the headers of a message too large (or too broken)
    to parse, wherever they sit in its bytes (kombu writes the body first, so in a large
    message the headers come after megabytes of it): so a refused request is still answered
    under its id. ``(None, None)`` where there are none."""
    task_id = task = None
    for found in _HEADERS.finditer(raw):  # the last "headers" object is the envelope's
        rest = raw[found.end():found.end() + (64 << 10)]
        id_match, task_match = _HEADER_ID.search(rest), _HEADER_TASK.search(rest)
        if id_match:
            task_id = id_match.group(1).decode("utf-8", "replace")
            task = task_match.group(1).decode("utf-8", "replace") if task_match else None
    return task_id, task
