"""Dead letters: messages a GPU worker will not run, kept with the reason instead of lost.

A worker's transport checks every message it pops (:func:`check_message`) before kombu or
Celery decode anything: raw bytes that are not a Celery protocol-2 JSON envelope, a
content type other than JSON (pickle, yaml, msgpack never reach a deserializer), a
compressed body (never decompressed: a few MB of gzip can expand to gigabytes), an
unknown task, a message over ``max_message_bytes`` or nested deeper than ``max_nesting``.
Such a message, and a request whose execution ended its pool child ``max_child_deaths``
times, goes to the dead-letter stream with why, where from and when; the worker goes on.

- ``gpu-tasks:dlq``                   stream, one entry per dead letter: field ``entry``,
  the JSON of :class:`DeadLetter` (its ``id`` is the stream entry's id); trimmed to about
  :data:`MAX_ENTRIES`, so a flood of garbage cannot fill Redis
- ``gpu-tasks:dlq:deaths:<task id>``  how many pool children that request's execution ended

Light to import: the CLI (``gpu-tasks dlq``) reads and retries from here.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import redis
from celery.utils.time import maybe_iso8601

from gpu_tasks.control import scripts
from gpu_tasks.errors import DeadLetterError, shown
from gpu_tasks.keys import DEATHS_KEY, DLQ_KEY

MAX_ENTRIES = 1000
"""About how many dead letters are kept (the oldest go first): at most
``MAX_ENTRIES * RAW_CAP_BYTES`` of raw bytes in Redis, whatever an attacker pushes."""
RAW_CAP_BYTES = 64 << 10
"""Most raw bytes kept of one dead letter; a longer message is kept truncated (and cannot
be retried)."""
DEATHS_TTL_S = 24 * 3600
"""A request's pool-child death count is forgotten after this (as its result would be)."""

CONTENT_TYPE = "application/json"
CONTENT_ENCODINGS = frozenset({"utf-8", "utf8"})
_COUNTED = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')
"""A JSON string (skipped whole, brackets inside it do not count) or a bracket."""


@dataclass
class DeadLetter:
    """One message a worker refused (see the module)."""

    reason: str
    queue: str
    raw_b64: str
    raw_bytes: int
    truncated: bool
    at: float = field(default_factory=time.time)
    task_id: str | None = None
    task: str | None = None
    id: str = ""
    """The stream entry's id; empty until stored."""

    @classmethod
    def of(cls, raw: bytes, queue: str, reason: str, payload: Any = None) -> DeadLetter:
        """A dead letter of ``raw`` popped from ``queue``, with what ``payload`` (the decoded
        envelope, if it was one) says about its task."""
        headers = payload.get("headers") if isinstance(payload, dict) else None
        task_id = task = None
        if isinstance(headers, dict):
            task_id = headers.get("id") if isinstance(headers.get("id"), str) else None
            task = headers.get("task") if isinstance(headers.get("task"), str) else None
        kept = raw[:RAW_CAP_BYTES]
        return cls(reason=reason, queue=queue, raw_b64=base64.b64encode(kept).decode("ascii"),
                   raw_bytes=len(raw), truncated=len(kept) < len(raw), task_id=task_id,
                   task=task)

    @property
    def raw(self) -> bytes:
        return base64.b64decode(self.raw_b64)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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
                  loads: Callable[[str], Any] = json.loads) -> Checked:
    """Whether ``raw`` is a message a GPU worker may hand to Celery (``reason`` empty), or
    why not. ``tasks``: the registered task names (anything with ``in``), or None to accept
    any name; ``loads``: the JSON parser (the worker passes kombu's, which Celery would
    use, so that the parsed envelope and body are exactly what Celery would get).

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
    reason = _envelope_problem(payload, tasks)
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


def _envelope_problem(payload: dict[str, Any], tasks: Any) -> str:
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
    return _header_problem(headers)


def _header_problem(headers: dict[str, Any]) -> str:
    """Headers Celery's main process parses: a wrong type there raises outside any handler
    and ends the worker."""
    limit = headers.get("timelimit")
    if not (limit is None or (isinstance(limit, list | tuple) and len(limit) == 2
                              and all(_optional(t, int, float) and not isinstance(t, bool)
                                      for t in limit))):
        return f"headers.timelimit {limit!r} is not [soft, hard] (numbers or null)"
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


RESULT_TTL_S = 24 * 3600
"""How long the failure answering a dead-lettered request is kept (the app's result_expires)."""


def answer_dead_lettered(letter: DeadLetter, pipeline: redis.client.Pipeline) -> None:
    """Store (if none is) and publish a FAILURE result for ``letter``'s task id, as Celery's
    Redis result backend stores one: ``AsyncResult.get()`` raises ``DeadLettered``."""
    task_id = letter.task_id
    key = f"celery-task-meta-{task_id}"
    meta = json.dumps({
        "status": "FAILURE",
        "result": {"exc_type": "DeadLettered", "exc_module": "gpu_tasks.errors",
                   "exc_message": [f"the GPU worker refused task {letter.task} {task_id} and "
                                   f"kept it as a dead letter (gpu-tasks dlq list): "
                                   f"{letter.reason}", letter.reason]},
        "traceback": None, "children": [], "task_id": task_id,
        "date_done": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    })
    answer = scripts.register(pipeline, "dead_letter_answer")
    answer(keys=[key], args=[meta, RESULT_TTL_S], client=pipeline)


class HeldLetters:
    """Dead letters a worker could not store yet: Redis failed between handing it the
    message and taking its dead letter. The message is off its queue by then, so the
    worker holds the letter and stores it once Redis answers (:meth:`store`), instead of
    losing it. Bounded: past ``limit`` letters the oldest is dropped, and logged."""

    def __init__(self, limit: int = 64) -> None:
        self.letters: list[DeadLetter] = []
        self.limit = limit
        self.dropped = 0

    def __bool__(self) -> bool:
        return bool(self.letters)

    def hold(self, letter: DeadLetter) -> DeadLetter | None:
        """Keep ``letter``; returns the one dropped to make room, if any."""
        self.letters.append(letter)
        if len(self.letters) > self.limit:
            self.dropped += 1
            return self.letters.pop(0)
        return None

    def store(self, client: redis.Redis) -> int:
        """Store every held letter in one transaction; how many. Raises the Redis error
        (keeping them all) while Redis still fails."""
        if not self.letters:
            return 0
        pipe = client.pipeline(transaction=True)
        store = DeadLetterStore(client)
        for letter in self.letters:
            store.add(letter, pipe)
        pipe.execute()
        stored, self.letters = len(self.letters), []
        return stored


class DeadLetterStore:
    """Reads and writes dead letters; writers take an optional pipeline to compose."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def add(self, letter: DeadLetter, pipeline: redis.client.Pipeline | None = None) -> None:
        """Keep ``letter``; if it names a task id, answer that request with a
        :class:`~gpu_tasks.errors.DeadLettered` failure, so its producer's ``get()`` raises
        at once instead of waiting out its timeout (unless a result is stored already)."""
        entry = json.dumps({k: v for k, v in letter.to_json().items() if k != "id"})
        own = pipeline is None
        pipe = self.client.pipeline(transaction=True) if own else pipeline
        assert pipe is not None
        pipe.xadd(DLQ_KEY, {"entry": entry}, maxlen=MAX_ENTRIES, approximate=True)
        if letter.task_id:
            answer_dead_lettered(letter, pipe)
        if own:
            pipe.execute()

    def list(self, limit: int | None = None) -> list[DeadLetter]:
        """Dead letters, newest first."""
        rows: Any = self.client.xrevrange(DLQ_KEY, count=limit)
        return [self._letter(entry_id, fields) for entry_id, fields in rows]

    def count(self) -> int:
        return int(self.client.xlen(DLQ_KEY))

    def get(self, letter_id: str) -> DeadLetter:
        rows: Any
        try:
            rows = self.client.xrange(DLQ_KEY, letter_id, letter_id)
        except redis.ResponseError:
            rows = []  # not a stream id at all
        if not rows:
            raise DeadLetterError(f"no dead letter {letter_id!r}", letter_id)
        return self._letter(*rows[0])

    def remove(self, letter_id: str, pipeline: redis.client.Pipeline | None = None) -> None:
        (pipeline or self.client).xdel(DLQ_KEY, letter_id)

    def purge(self) -> int:
        """Drop every dead letter; returns how many there were."""
        pipe = self.client.pipeline(transaction=True)
        pipe.xlen(DLQ_KEY)
        pipe.delete(DLQ_KEY)
        return int(pipe.execute()[0])

    def retry(self, letter_id: str, *, max_bytes: int, max_nesting: int,
              tasks: Any = None) -> DeadLetter:
        """Push a dead letter's raw message back at the tail of its queue (as if just sent)
        and drop it from the dead letters, in one transaction; only if it was kept whole and
        now passes :func:`check_message` (e.g. after someone fixed it up), else
        :class:`~gpu_tasks.errors.DeadLetterError`."""
        letter = self.get(letter_id)
        if letter.truncated:
            raise DeadLetterError(
                f"dead letter {letter_id} was kept truncated ({RAW_CAP_BYTES} of "
                f"{letter.raw_bytes} bytes): it cannot be sent again", letter_id)
        raw = letter.raw
        reason = check_message(raw, max_bytes=max_bytes, max_nesting=max_nesting,
                               tasks=tasks).reason
        if reason:
            raise DeadLetterError(f"dead letter {letter_id} still fails: {reason}", letter_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.lpush(letter.queue, raw)
        self.remove(letter_id, pipe)
        pipe.execute()
        return letter

    def replace_raw(self, letter_id: str, raw: bytes) -> DeadLetter:
        """Store ``raw`` (a fixed-up message) in place of a dead letter's, as a new entry
        with the same queue and reason; returns it. For operators and tests."""
        old = self.get(letter_id)
        new = DeadLetter.of(raw, old.queue, old.reason)
        pipe = self.client.pipeline(transaction=True)
        self.add(new, pipe)
        self.remove(letter_id, pipe)
        new.id = pipe.execute()[0].decode()
        return new

    def count_death(self, task_id: str) -> int:
        """One more pool child ended while running ``task_id``; returns how many so far."""
        key = DEATHS_KEY.format(task_id=task_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.incr(key)
        pipe.expire(key, DEATHS_TTL_S)
        return int(pipe.execute()[0])

    @staticmethod
    def _letter(entry_id: bytes | str, fields: dict[bytes, bytes]) -> DeadLetter:
        data = json.loads(fields[b"entry"])
        data["id"] = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        return DeadLetter(**data)
