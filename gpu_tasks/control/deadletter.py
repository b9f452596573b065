"""Dead letters: messages a GPU worker will not run, kept with the reason instead of lost.

A message a worker's transport refuses (:func:`gpu_tasks.protocol.checks.check_message`
says why), and a request whose execution ended its pool child ``max_child_deaths`` times,
goes to the dead-letter stream with why, where from and when; the worker goes on.

- ``gpu-tasks:dlq``                   stream, one entry per dead letter: field ``entry``,
  the JSON of :class:`DeadLetter` (its ``id`` is the stream entry's id); trimmed to about
  :data:`MAX_ENTRIES`, so a flood of garbage cannot fill Redis
- ``gpu-tasks:dlq:deaths:<task id>``  how many pool children that request's execution ended

Light to import: the CLI (``gpu-tasks dlq``) reads and retries from here.
"""

from __future__ import annotations

import base64
import datetime
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from gpu_tasks.control import scripts
from gpu_tasks.errors import DeadLetterError
from gpu_tasks.keys import DEATHS_KEY, DLQ_KEY
from gpu_tasks.protocol.checks import check_message, ids_in_raw

MAX_ENTRIES = 1000
"""About how many dead letters are kept (the oldest go first): at most
``MAX_ENTRIES * RAW_CAP_BYTES`` of raw bytes in Redis, whatever an attacker pushes."""
RAW_CAP_BYTES = 64 << 10
"""Most raw bytes kept of one dead letter; a longer message is kept truncated (and cannot
be retried)."""
DEATHS_TTL_S = 24 * 3600
"""A request's pool-child death count is forgotten after this (as its result would be)."""

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
        elif payload is None:  # not parsed (too large, not JSON): read its bytes for them
            task_id, task = ids_in_raw(raw)
        kept = raw[:RAW_CAP_BYTES]
        return cls(reason=reason, queue=queue, raw_b64=base64.b64encode(kept).decode("ascii"),
                   raw_bytes=len(raw), truncated=len(kept) < len(raw), task_id=task_id,
                   task=task)

    @property
    def raw(self) -> bytes:
        return base64.b64decode(self.raw_b64)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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

    def dead_letter_if_deadly(self, task_id: str, raw: bytes, queue: str, payload: Any,
                              max_deaths: int, settle: Callable[[Any], None]) -> DeadLetter | None:
        """Count one more pool child ended by ``task_id``; at ``max_deaths`` keep its message
        as a dead letter and call ``settle`` with the transaction that stores it (to
        acknowledge the message in the same step). Returns the letter, or None (below)."""
        deaths = self.count_death(task_id)
        if deaths < max_deaths:
            return None
        letter = DeadLetter.of(raw, queue, f"its execution ended the pool child {deaths} "
                                           "times (GPU_TASKS_MAX_CHILD_DEATHS)", payload)
        pipe = self.client.pipeline(transaction=True)
        self.add(letter, pipe)
        settle(pipe)
        pipe.execute()
        return letter

    @staticmethod
    def _letter(entry_id: bytes | str, fields: dict[bytes, bytes]) -> DeadLetter:
        data = json.loads(fields[b"entry"])
        data["id"] = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        return DeadLetter(**data)
