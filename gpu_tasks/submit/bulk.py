"""Bulk publishing: many entity requests at Redis speed, as ``apply_async`` would send them.

::

    from gpu_tasks.submit.bulk import submit_many

    ids = submit_many({"entity_id": f"user-{i}", "task": "gpu_tasks.alloc",
                       "kwargs": {"name": "emb", "shape": [256]}} for i in range(100_000))

Each request is the shape of a ``gpu-tasks batch`` line: ``entity_id``, ``task`` (a task
name; ``alloc`` means ``gpu_tasks.alloc``) and ``kwargs``. The messages are the
protocol-2 JSON envelopes ``apply_async`` sends (:mod:`gpu_tasks.protocol.envelope`), so workers
cannot tell them apart, and results are stored and read the same way
(``app.AsyncResult(task_id)``). What ``apply_async`` pays per call and this does not:
Celery's message assembly, kombu's producer and channel for each publish, and one
Redis round trip per request. Requests are sent in chunks, each chunk one pipeline
with one ``LPUSH`` per shard queue (in order, so each shard keeps its order).

Every request of a chunk is checked (task known, arguments it accepts, entity id,
size) before the chunk is sent; a bad one raises :class:`~gpu_tasks.errors.RoutingError`
naming its position, after the chunks before it were sent (the error says how many).
``gpu-tasks batch`` checks a whole file first and sends exactly once.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import redis
import xxhash

from gpu_tasks.app import app as default_app
from gpu_tasks.errors import BrokerUnavailable, RoutingError
from gpu_tasks.protocol.envelope import TaskTemplate, new_task_ids
from gpu_tasks.protocol.routing import (
    ENTITY_KWARG,
    ROUTED_TASK_NAMES,
    shard_name,
    validate_entity_id,
)

CHUNK_REQUESTS = 5000
"""Requests per pipeline: large enough that a round trip is a few percent of a chunk,
small enough that a chunk's memory and Redis's pause for it stay small."""
ENVELOPE_BYTES = 1024
"""Room an envelope takes beyond its base64 body (headers, properties, kwargsrepr)."""


def task_name(text: str) -> str:
    """A task as a user may write it: ``alloc`` is ``gpu_tasks.alloc``."""
    return text if "." in text else f"gpu_tasks.{text}"


@dataclass(frozen=True)
class TaskSpec:
    """What a request for one entity-routed task must look like, from its signature."""

    template: TaskTemplate
    accepted: frozenset[str] | None
    """Keyword arguments it takes; None: any (it has ``**kwargs``)."""
    required: frozenset[str]

    @classmethod
    def for_task(cls, app: Any, name: str) -> TaskSpec:
        task = app.tasks.get(name)
        if task is None or not (name in ROUTED_TASK_NAMES or getattr(task, "entity_routed",
                                                                        False)):
            known = ", ".join(sorted(ROUTED_TASK_NAMES))
            raise RoutingError(
                f"unknown task {name!r}: not an entity-routed task this producer knows "
                f"(known: {known}; import the module that defines yours)")
        params = list(inspect.signature(task.run).parameters.values())
        if params and params[0].name == "self":
            params = params[1:]
        accepted = None
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            accepted = frozenset(p.name for p in params if p.kind != p.VAR_POSITIONAL)
        required = frozenset(p.name for p in params if p.default is p.empty and
                             p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        return cls(TaskTemplate.for_task(app, name), accepted, required - {ENTITY_KWARG})

    def check(self, kwargs: Mapping[str, Any]) -> str | None:
        """Why ``kwargs`` (with entity_id) cannot be sent to this task; None if it can."""
        if self.accepted is not None:
            unknown = kwargs.keys() - self.accepted
            if unknown:
                return (f"task {self.template.name} takes no argument "
                        f"{', '.join(sorted(unknown))}")
        missing = self.required - kwargs.keys()
        if missing:
            return f"task {self.template.name} needs {', '.join(sorted(missing))}"
        return None


@dataclass
class Prepared:
    """One checked request, ready to send."""

    queue: bytes
    task_id: str
    payload: bytes


_encode_json = json.JSONEncoder(allow_nan=False).encode
_FIELDS = frozenset(("entity_id", "task", "kwargs"))
_NO_KWARGS: dict[str, Any] = {}
_xxh64 = xxhash.xxh64_intdigest


class Publisher:
    """Builds and sends requests for one app (its tasks, S, its Redis)."""

    def __init__(self, app: Any, max_message_bytes: int) -> None:
        self.app = app
        self.max_message_bytes = max_message_bytes
        app.loader.import_default_modules()  # users' tasks (GPU_TASKS_IMPORTS) are known
        self.shard_count = app.conf.task_routes[0].shard_count  # reads S once
        self.max_entity_id_chars: int = app.conf.task_routes[0].max_entity_id_chars
        self._queues = [shard_name(i).encode() for i in range(self.shard_count)]
        self._specs: dict[str, TaskSpec] = {}

    def spec(self, name: str) -> TaskSpec:
        """The spec of task ``name`` (``alloc`` or ``gpu_tasks.alloc``), looked up once."""
        spec = self._specs.get(name)
        if spec is None:
            spec = self._specs[name] = TaskSpec.for_task(self.app, task_name(name))
        return spec

    def parse(self, request: Any) -> tuple[str, int, TaskSpec, dict[str, Any], bytes]:
        """``(entity_id, shard index, spec, kwargs with entity_id, kwargs JSON)`` of one
        request, or :class:`RoutingError` saying what is wrong with it."""
        # Runs once per request of a bulk send: C-level set operations, no helper calls
        # on the common path (a dict with a good entity id, a known task, kwargs a dict).
        if type(request) is not dict and not isinstance(request, Mapping):
            raise RoutingError(f"a request is a mapping with entity_id, task and kwargs, "
                               f"not {type(request).__name__}")
        if not _FIELDS.issuperset(request):
            extra = request.keys() - _FIELDS
            raise RoutingError(f"unknown field {', '.join(sorted(map(str, extra)))} "
                               "(a request has entity_id, task, kwargs)")
        entity_id = request.get("entity_id")
        try:
            index = _xxh64(entity_id.encode()) % self.shard_count  # type: ignore[union-attr]
        except (AttributeError, UnicodeEncodeError):
            index = -1
        if index < 0 or type(entity_id) is not str or not entity_id or (
                len(entity_id) > self.max_entity_id_chars):
            validate_entity_id(entity_id, self.max_entity_id_chars)  # raises, naming it
        name = request.get("task")
        spec = self._specs.get(name) if type(name) is str else None  # type: ignore[arg-type]
        if spec is None:
            if not isinstance(name, str) or not name:
                raise RoutingError(f"task must be a task name, got {name!r}")
            spec = self.spec(name)
        given = request.get("kwargs", _NO_KWARGS)
        if type(given) is not dict and not isinstance(given, Mapping):
            raise RoutingError(f"kwargs must be an object, got {type(given).__name__}")
        if ENTITY_KWARG in given and given[ENTITY_KWARG] != entity_id:
            raise RoutingError(f"kwargs.entity_id {given[ENTITY_KWARG]!r} differs from "
                               f"entity_id {entity_id!r}")
        kwargs = {ENTITY_KWARG: entity_id, **given}
        if not ((spec.accepted is None or spec.accepted.issuperset(kwargs))
                and spec.required.issubset(kwargs)):
            raise RoutingError(spec.check(kwargs) or "bad arguments")
        try:
            kwargs_json = _encode_json(kwargs).encode()
        except (TypeError, ValueError) as exc:
            raise RoutingError(f"kwargs cannot be sent as JSON: {exc}") from None
        except UnicodeEncodeError as exc:
            raise RoutingError(f"entity_id or kwargs are not valid Unicode text: {exc}"
                               ) from None
        if len(kwargs_json) * 4 // 3 + ENVELOPE_BYTES > self.max_message_bytes:
            size = len(kwargs_json) * 4 // 3 + ENVELOPE_BYTES
            raise RoutingError(f"the request is about {size} bytes encoded, over the "
                               f"{self.max_message_bytes}-byte limit (GPU_TASKS_MAX_MESSAGE)")
        return cast(str, entity_id), index, spec, kwargs, kwargs_json

    def prepare(self, request: Any, task_id: str, delivery_tag: str) -> Prepared:
        """One request as its shard queue will hold it (raises :class:`RoutingError`)."""
        _, index, spec, kwargs, kwargs_json = self.parse(request)
        queue = self._queues[index]
        return Prepared(queue, task_id, spec.template.payload(
            kwargs_json, kwargs, task_id.encode(), queue, delivery_tag.encode()))

    def prepare_chunk(self, chunk: list[Any], ids: list[str]) -> list[bytes]:
        """The LPUSH commands of ``chunk`` (one per shard queue, requests in their order),
        with ``ids[2i]`` as request i's task id and ``ids[2i + 1]`` as its delivery tag.
        Raises :class:`RoutingError` with ``args[1]`` the bad request's index."""
        # The hot loop of a bulk send: locals instead of attribute lookups, no object per
        # request, grouped by queue as it goes.
        parse, queues = self.parse, self._queues
        by_queue: dict[bytes, list[bytes]] = {}
        for i, request in enumerate(chunk):
            try:
                _, index, spec, kwargs, kwargs_json = parse(request)
            except RoutingError as exc:
                raise RoutingError(str(exc), i) from None
            queue = queues[index]
            payload = spec.template.payload(kwargs_json, kwargs, ids[2 * i].encode(), queue,
                                            ids[2 * i + 1].encode())
            waiting = by_queue.get(queue)
            if waiting is None:
                by_queue[queue] = [payload]
            else:
                waiting.append(payload)
        return [lpush_command(q, payloads) for q, payloads in by_queue.items()]



def lpush_command(key: bytes, values: list[bytes]) -> bytes:
    """``LPUSH key v1 v2 ...`` in RESP, packed at once: redis-py's packer costs about as much
    per argument as building the message itself."""
    parts = [b"*%d\r\n$5\r\nLPUSH\r\n$%d\r\n%s\r\n" % (len(values) + 2, len(key), key)]
    parts.extend(b"$%d\r\n%s\r\n" % (len(v), v) for v in values)
    return b"".join(parts)


class PackedPipe:
    """A pipeline of packed commands on one connection, one batch of them in flight: the
    caller builds the next batch while Redis executes the last (on a 2-core host, Python
    and Redis each keep one core busy instead of taking turns). Replies that are errors
    are raised by :meth:`collect`."""

    def __init__(self, client: redis.Redis) -> None:
        self.pool = client.connection_pool
        self.conn: Any = None
        self.pending = 0

    def __enter__(self) -> PackedPipe:
        self.conn = self.pool.get_connection()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pending:
            self.conn.disconnect()  # replies left unread: never reuse it
        self.pool.release(self.conn)

    def send(self, commands: list[bytes]) -> None:
        """Write ``commands``; their replies are read by the next :meth:`collect`."""
        self.collect()
        try:
            self.conn.send_packed_command([b"".join(commands)])
        except BaseException:
            self.conn.disconnect()
            raise
        self.pending = len(commands)

    def collect(self) -> list[Any]:
        """The replies of what was sent last (none if they were read already)."""
        replies = []
        try:
            while self.pending:
                replies.append(self.conn.read_response())
                self.pending -= 1
        except BaseException:
            self.conn.disconnect()
            raise
        for reply in replies:
            if isinstance(reply, redis.ResponseError):
                raise reply
        return replies


def _chunks(requests: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for request in requests:
        chunk.append(request)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def submit_many(requests: Iterable[Mapping[str, Any]], *, app: Any = None,
                results: bool = False, chunk_size: int = CHUNK_REQUESTS) -> list[Any]:
    """Send ``requests`` (mappings with ``entity_id``, ``task``, ``kwargs``) to their shard
    queues; return their task ids, or their ``AsyncResult``s with ``results=True``.

    Raises :class:`RoutingError` for a bad request (its position, and how many requests
    before it were sent) and :class:`BrokerUnavailable` when Redis does not take a chunk.
    """
    from gpu_tasks import settings as _settings

    if app is None:
        app = default_app
    settings = _settings.current()
    publisher = Publisher(app, settings.max_message_bytes)
    client = settings.redis_client()
    sent: list[str] = []
    flying: list[str] = []  # the ids of the chunk Redis may still be executing

    def confirm(pipe: PackedPipe) -> None:
        try:
            pipe.collect()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise BrokerUnavailable(
                f"Redis did not confirm requests {len(sent)}-{len(sent) + len(flying) - 1} "
                f"({type(exc).__name__}: {exc}): they may or may not have been enqueued; the "
                f"{len(sent)} before them were", settings.redis_url_shown) from exc
        sent.extend(flying)
        flying.clear()

    try:
        with PackedPipe(client) as pipe:
            for chunk in _chunks(requests, chunk_size):
                ids = new_task_ids(2 * len(chunk))
                try:
                    commands = publisher.prepare_chunk(chunk, ids)
                except RoutingError as exc:
                    confirm(pipe)
                    raise RoutingError(
                        f"request {len(sent) + exc.args[1]}: {exc}; the {len(sent)} requests "
                        "before its chunk were sent, none from its chunk on") from None
                confirm(pipe)
                try:
                    pipe.send(commands)
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    raise BrokerUnavailable(
                        f"Redis did not take requests {len(sent)}-"
                        f"{len(sent) + len(chunk) - 1} ({type(exc).__name__}: {exc}); the "
                        f"{len(sent)} before them were sent", settings.redis_url_shown) from exc
                flying.extend(ids[0::2])
            confirm(pipe)
    finally:
        client.close()
    if results:
        return [app.AsyncResult(task_id) for task_id in sent]
    return sent
