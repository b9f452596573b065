"""Fuzzing GPU workers: hypothesis strategies over every built-in task's arguments and over
raw queue bytes, and a runner that sends them to a real cluster and judges every answer.

Used by ``tests/integration/workers/test_fuzz.py`` (a few hundred cases, hypothesis profile
``ci``) and by ``benchmarks/chaos.py`` (``make chaos``: 10,000 examples and more, profile
``chaos``).

A *case* is one request or one raw message. Each hypothesis example is a small batch of
them: a few requests on one to three fresh entities (so that a write finds the buffer an
earlier alloc of the batch made, in order: one entity's requests share a shard queue),
sent all at once and then collected, or a few raw messages ``LPUSH``-ed onto a shard queue
and a GPU queue, each queue followed by a good request. Every case must end in:

- a request: its result, or an exception of :mod:`gpu_tasks.errors` (raised at submit time,
  or rebuilt from the stored failure), within the batch's timeout. Anything else is
  *untyped* (a ``TypeError`` at submit, Celery's own errors, a class the result backend had
  to invent); a ``DeviceError`` saying "failed inside the GPU worker: <type>: ..." is the
  worker's wrapping of an untyped error in a built-in (``workers/child/runtime.py`` logs it as a
  bug) and is counted as *wrapped*; no answer in time is a *hang*.
- a raw message: a dead letter in ``gpu-tasks:dlq`` holding its bytes, or an answer (a
  result, typed as above) for the task id it carries; one still held by a worker, still
  queued, or gone without either is a *hang* (or *vanished*).

And no worker may die meanwhile: every GPU worker's main process and its pool child keep
their pids (no generated request kills a child on purpose: the ``fault`` kernel and
``tests.die`` are never sent).

Each failure is kept with a reproducer: the Python lines that send the same requests (the
entity's requests of the batch up to the failing one), or the raw bytes and the queue.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from gpu_tasks.errors import GpuTasksError
from gpu_tasks.keys import DLQ_KEY
from gpu_tasks.protocol.routing import shard_index, shard_name

# -- hypothesis profiles -----------------------------------------------------------------

CI_EXAMPLES = 60
"""Examples per property in the tests (each example is a batch of several cases)."""
CHAOS_EXAMPLES = 10_000

# No shrinking in the tests: every step would be another round trip to the cluster, and the
# assertion message already holds a reproducer (the entity's requests up to the failing one).
settings.register_profile(
    "ci", max_examples=CI_EXAMPLES, deadline=None, database=None, derandomize=True,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=list(HealthCheck), print_blob=True)
settings.register_profile(
    "chaos", max_examples=CHAOS_EXAMPLES, deadline=None, database=None,
    suppress_health_check=list(HealthCheck), print_blob=True)

# -- values ------------------------------------------------------------------------------

BUILT_IN_ENTITY_TASKS = ("gpu_tasks.alloc", "gpu_tasks.write", "gpu_tasks.read",
                         "gpu_tasks.free", "gpu_tasks.run")
BUILT_IN_GPU_TASKS = ("gpu_tasks.stats", "gpu_tasks.export_shard", "gpu_tasks.import_shard",
                      "gpu_tasks.release_shard")
DTYPES = ("float16", "float32", "float64", "int32", "int64", "uint8")
KERNELS = ("fill", "scale", "axpy", "sum", "sgemm")
"""Every kernel but ``fault``, which ends the pool child on purpose."""
NAMES = ("a", "b", "c")
NAN, INF = math.nan, math.inf

EDGE_INTS = (-1, 0, 1, 2**8, 2**15, 2**16, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1,
             2**63, 2**64, -(2**63) - 1, 10**30, -(10**30), 10**300)
EDGE_FLOATS = (NAN, INF, -INF, -0.0, 0.5, 1.5, -1.5, 1e308, -1e308, 5e-324, 65504.0, 70000.0,
               3.4028235e38, 1e39, 2.0**63, 2.0**64)
ODD_TEXT = ("", " ", "\x00", "\ud800", "\udfff", "a" * 300, "é", "\U0001F600", "NaN", "null",
            "[1]", "{", "%s%n", "../../x", "\n", "a\x00b", "float32", "fill", "safe",
            "1", "0x10", "1e5")

ints = st.one_of(st.integers(-3, 70), st.sampled_from(EDGE_INTS), st.integers())
floats = st.one_of(st.floats(), st.sampled_from(EDGE_FLOATS))
texts = st.one_of(st.text(max_size=12), st.sampled_from(ODD_TEXT))
scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts)


def nested(depth: int, leaf: Any = 0) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


json_values = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                     st.dictionaries(texts, inner, max_size=4)),
    max_leaves=10)
deep = st.integers(2, 200).map(nested)
junk = st.one_of(scalars, json_values, deep)
"""Any value JSON can carry, wrong for most parameters: None, booleans, edge ints (2**63,
2**64, 10**300), NaN and infinities, odd strings (empty, NUL, lone surrogates, 300
characters), lists, objects, nesting up to 200 deep."""


def sometimes(valid: st.SearchStrategy[Any], wrong: st.SearchStrategy[Any] = junk,
              valid_in: int = 3) -> st.SearchStrategy[Any]:
    """Mostly ``valid`` (``valid_in`` in ``valid_in + 1``), else ``wrong``."""
    return st.one_of(*([valid] * valid_in), wrong)


names = sometimes(st.sampled_from(NAMES), valid_in=6)
shapes = sometimes(st.one_of(st.integers(1, 16),
                             st.lists(st.integers(1, 6), min_size=1, max_size=3)))
dtypes = sometimes(st.sampled_from(DTYPES),
                   st.one_of(st.sampled_from(("float", "int", "bool", "complex64", "float128",
                                              "object", "U8", "<f4", "FLOAT32", "int8")), junk))
numbers = st.one_of(st.integers(-300, 300), st.floats(width=32, allow_nan=False,
                                                      allow_infinity=False),
                    st.sampled_from(EDGE_INTS), st.sampled_from(EDGE_FLOATS))
value_lists = sometimes(st.lists(numbers, max_size=12),
                        st.one_of(st.lists(scalars, max_size=6), junk))
data_b64 = sometimes(st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
                     st.one_of(st.sampled_from(("!!!", "AAA", "AAAA=", "====", " AAAA", "\ud800")),
                               junk))
offsets = sometimes(st.integers(0, 12))
counts = sometimes(st.one_of(st.none(), st.integers(0, 12)))
generations = st.one_of(st.none(), st.none(), st.none(), st.integers(0, 5), junk)
casts = sometimes(st.sampled_from(("safe", "unsafe")),
                  st.one_of(st.sampled_from(("same_kind", "equiv", "no", "SAFE")), junk))
kernel_names = sometimes(st.sampled_from(KERNELS),
                         st.one_of(st.sampled_from(("Sum", "gemm", "nope", "", "fill ")), junk))
kernel_scalars = sometimes(numbers)
unknown_keys = st.one_of(st.sampled_from(("self", "gpu", "colour", "args", "kwargs", "task",
                                          "queue", "__class__", "", " name", "Name", "id",
                                          "generation ", "x", "out", "value")), texts)
# ``entity_id`` is the router's key, generated on its own (``entity_ids``).
unknown_kwargs = st.dictionaries(unknown_keys.filter(lambda k: k != "entity_id"), junk,
                                 max_size=2)

TASK_PARAMETERS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "gpu_tasks.alloc": {"name": names, "shape": shapes, "dtype": dtypes},
    "gpu_tasks.write": {"name": names, "values": value_lists, "data_b64": data_b64,
                        "offset": offsets, "generation": generations, "cast": casts},
    "gpu_tasks.read": {"name": names, "as_list": sometimes(st.booleans()),
                       "generation": generations, "offset": offsets, "count": counts},
    "gpu_tasks.free": {"name": names},
    "gpu_tasks.run": {"kernel": kernel_names, "generation": generations, "cast": casts,
                      "out": names, "x": names, "y": names, "a": names, "b": names,
                      "c": names, "value": kernel_scalars, "alpha": kernel_scalars,
                      "beta": kernel_scalars},
    "gpu_tasks.stats": {},
    "gpu_tasks.export_shard": {"shard": sometimes(st.integers(0, 1100)),
                               "handoff": sometimes(st.text(min_size=1, max_size=8))},
    "gpu_tasks.import_shard": {"shard": sometimes(st.integers(0, 1100)),
                               "handoff": sometimes(st.text(min_size=1, max_size=8)),
                               "version": sometimes(st.integers(0, 5))},
    "gpu_tasks.release_shard": {"shard": sometimes(st.integers(0, 1100)),
                                "handoff": sometimes(st.text(min_size=1, max_size=8))},
}
"""Each task's parameters, every one optional here: a missing required one is a case too."""
REQUIRED = {"gpu_tasks.alloc": ("name", "shape"), "gpu_tasks.write": ("name",),
            "gpu_tasks.read": ("name",), "gpu_tasks.run": ("kernel",),
            "gpu_tasks.export_shard": ("shard", "handoff"),
            "gpu_tasks.import_shard": ("shard", "handoff"),
            "gpu_tasks.release_shard": ("shard", "handoff")}
KERNEL_PARAMETERS = {"fill": ("out", "value"), "scale": ("x", "alpha", "out"),
                     "axpy": ("x", "y", "alpha"), "sum": ("x",),
                     "sgemm": ("a", "b", "c", "alpha", "beta")}
ENTITY_TASK_WEIGHTS = ("gpu_tasks.alloc",) * 3 + ("gpu_tasks.write",) * 3 + (
    "gpu_tasks.read",) * 2 + ("gpu_tasks.free",) + ("gpu_tasks.run",) * 4


# -- requests ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One request of a batch. ``entity`` indexes the batch's entities (None: a task for a
    GPU's own queue, ``gpu`` says which); ``entity_id``, when set, replaces the entity's id
    (a wrong one: the router must refuse it)."""

    task: str
    kwargs: dict[str, Any]
    via: str = "apply_async"
    """``apply_async`` (Celery checks the arguments against the signature) or ``send_task``
    (by name, unchecked: what other languages do)."""
    entity: int | None = 0
    gpu: int = 0
    entity_id: Any = None
    odd_entity: bool = False

    def python(self, entity_ids: Sequence[str], gpu_queues: Sequence[str]) -> str:
        """This request as a line of Python (``from gpu_tasks.app import app`` and
        ``from gpu_tasks import tasks`` assumed)."""
        kwargs = dict(self.kwargs)
        options = ""
        if self.entity is None:
            options = f", queue={gpu_queues[self.gpu % len(gpu_queues)]!r}"
        else:
            kwargs = {"entity_id": self.entity_id if self.odd_entity
                      else entity_ids[self.entity], **kwargs}
        if self.via == "send_task":
            return f"app.send_task({self.task!r}, kwargs={py(kwargs)}{options})"
        return f"tasks.{self.task.rsplit('.', 1)[1]}.apply_async(kwargs={py(kwargs)}{options})"


def py(value: Any) -> str:
    """``repr`` that Python reads back, NaN and infinities included."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"float({str(value)!r})"
    if isinstance(value, list):
        return "[" + ", ".join(py(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{py(k)}: {py(v)}" for k, v in value.items()) + "}"
    return repr(value)


@st.composite
def task_kwargs(draw: st.DrawFn, task: str) -> dict[str, Any]:
    """Keyword arguments for ``task``: each parameter drawn (mostly valid) or left out, the
    required ones mostly given, sometimes unknown ones added."""
    params = TASK_PARAMETERS[task]
    required = REQUIRED.get(task, ())
    kwargs: dict[str, Any] = {}
    if task == "gpu_tasks.run":
        kernel = draw(kernel_names)
        kwargs["kernel"] = kernel
        wanted = KERNEL_PARAMETERS.get(kernel, ()) if isinstance(kernel, str) else ()
        for param in wanted:
            if draw(st.integers(0, 9)) < 9:
                kwargs[param] = draw(params[param])
        optional = [p for p in params if p not in wanted and p != "kernel"]
    else:
        optional = []
        for param in params:
            if param in required:
                if draw(st.integers(0, 19)) < 19:
                    kwargs[param] = draw(params[param])
            else:
                optional.append(param)
    for param in optional:
        if draw(st.integers(0, 4)) == 0:
            kwargs[param] = draw(params[param])
    if task == "gpu_tasks.write" and "values" not in kwargs and "data_b64" not in kwargs \
            and draw(st.integers(0, 9)) < 8:
        kwargs["values"] = draw(params["values"])
    if draw(st.integers(0, 9)) == 0:
        kwargs.update(draw(unknown_kwargs))
    return kwargs


entity_ids_odd = st.one_of(st.sampled_from(("", "\ud800", "x" * 1025, " ")), scalars,
                           json_values)


@st.composite
def requests(draw: st.DrawFn, entities: int) -> Request:
    """One request on one of ``entities`` entities, or (1 in 10) to a GPU's own queue."""
    via = draw(st.sampled_from(("apply_async", "apply_async", "send_task")))
    if draw(st.integers(0, 9)) == 0:
        task = draw(st.sampled_from(BUILT_IN_GPU_TASKS))
        return Request(task, draw(task_kwargs(task)), via, None, draw(st.integers(0, 7)))
    task = draw(st.sampled_from(ENTITY_TASK_WEIGHTS))
    entity = draw(st.integers(0, entities - 1))
    if draw(st.integers(0, 29)) == 0:
        return Request(task, draw(task_kwargs(task)), via, entity,
                       entity_id=draw(entity_ids_odd), odd_entity=True)
    return Request(task, draw(task_kwargs(task)), via, entity)


@st.composite
def request_batches(draw: st.DrawFn, max_requests: int = 10) -> tuple[int, list[Request]]:
    """``(entities, requests)``: a batch of requests over one to three fresh entities."""
    entities = draw(st.integers(1, 3))
    return entities, draw(st.lists(requests(entities), min_size=1, max_size=max_requests))


# -- raw messages ------------------------------------------------------------------------


@dataclass(frozen=True)
class RawCase:
    """Raw bytes for one queue: ``on_gpu_queue`` picks a GPU's own queue, else the shard
    queue of the batch's entity. ``task_id``: the id its envelope carries (its answer is
    looked for there), if it is one."""

    raw: bytes
    on_gpu_queue: bool
    task_id: str | None = None
    shape: str = ""
    """Which generator made it (``bytes``, ``json``, ``envelope``, ...)."""
    needles: tuple[bytes, ...] = ()
    """Ids it carries (task id, delivery tag, correlation id): how to find it in a queue."""


ENVELOPE_PATHS = (
    "body", "content-type", "content-encoding", "headers", "properties",
    "headers.id", "headers.task", "headers.eta", "headers.expires", "headers.timelimit",
    "headers.retries", "headers.group", "headers.group_index", "headers.root_id",
    "headers.parent_id", "headers.shadow", "headers.lang", "headers.argsrepr",
    "headers.kwargsrepr", "headers.origin", "headers.ignore_result", "headers.stamps",
    "headers.stamped_headers", "headers.replaced_task_nesting", "headers.compression",
    "properties.delivery_tag", "properties.delivery_info", "properties.delivery_info.exchange",
    "properties.delivery_info.routing_key", "properties.body_encoding",
    "properties.correlation_id", "properties.reply_to", "properties.priority",
    "properties.delivery_mode", "body.args", "body.kwargs", "body.embed",
    "body.embed.callbacks", "body.embed.errbacks", "body.embed.chain", "body.embed.chord",
)
_DELETE = object()
iso_dates = st.sampled_from(("2000-01-01T00:00:00", "1970-01-01T00:00:00+00:00", "soon",
                             "2024-13-45T99:99:99", "", "tomorrow", "9999-12-31T23:59:59",
                             "2000-01-01T00:00:00+25:00"))
plausible = {
    "headers.timelimit": st.one_of(st.lists(st.one_of(st.none(), numbers), min_size=2,
                                            max_size=2), junk),
    "headers.eta": st.one_of(iso_dates, numbers, junk),
    "headers.expires": st.one_of(iso_dates, numbers, junk),
    "headers.retries": st.one_of(ints, junk),
    "headers.task": st.one_of(st.sampled_from(BUILT_IN_ENTITY_TASKS + BUILT_IN_GPU_TASKS
                                              + ("celery.chord_unlock", "celery.backend_cleanup",
                                                 "celery.chain", "celery.group",
                                                 "celery.map", "celery.starmap",
                                                 "celery.chunks", "celery.accumulate",
                                                 "gpu_tasks.nope")), texts),
    "content-type": st.one_of(st.sampled_from(("application/json", "application/x-yaml",
                                               "application/x-python-serialize",
                                               "application/data", "text/plain")), junk),
    "content-encoding": st.one_of(st.sampled_from(("utf-8", "UTF8", "binary", "gzip",
                                                   "latin-1", "ascii")), junk),
    "properties.body_encoding": st.one_of(st.sampled_from(("base64", "raw", "BASE64")), junk),
}


@st.composite
def envelopes(draw: st.DrawFn) -> tuple[dict[str, Any], list[Any], str]:
    """A Celery protocol-2 envelope (as a dict to spoil), its body ``[args, kwargs, embed]``
    (the entity id left to :func:`RawCase` building) and its task id."""
    task = draw(st.sampled_from(BUILT_IN_ENTITY_TASKS + BUILT_IN_GPU_TASKS))
    kwargs = draw(task_kwargs(task))
    task_id = str(uuid.uuid4())
    body: list[Any] = [[], kwargs, {"callbacks": None, "errbacks": None, "chain": None,
                                     "chord": None}]
    payload: dict[str, Any] = {
        "body": "",
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None,
            "expires": None, "group": None, "group_index": None, "retries": 0,
            "timelimit": [None, None], "root_id": task_id, "parent_id": None,
            "argsrepr": "()", "kwargsrepr": "{}", "origin": "fuzz", "ignore_result": False,
        },
        "properties": {
            "correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": ""}, "priority": 0,
            "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
        },
    }
    return payload, body, task_id


def _spoil(target: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for p in parents:
        nxt = target.get(p)
        if not isinstance(nxt, dict):
            return
        target = nxt
    if value is _DELETE:
        target.pop(last, None)
    else:
        target[last] = value


@st.composite
def raw_cases(draw: st.DrawFn) -> tuple[str, dict[str, Any] | None, list[Any] | None, bytes,
                                          bool, str | None]:
    """``(shape, envelope, body, raw, on_gpu_queue, task_id)``: raw bytes, or an envelope
    and body to finish (the entity id goes in once the queue is known)."""
    on_gpu_queue = draw(st.booleans())
    shape = draw(st.sampled_from(("bytes", "text", "json", "envelope", "envelope",
                                  "envelope", "envelope", "numbers", "deep")))
    if shape == "bytes":
        return shape, None, None, draw(st.binary(max_size=300)), on_gpu_queue, None
    if shape == "text":
        text = draw(st.one_of(texts, st.text(max_size=200)))
        return shape, None, None, text.encode("utf-8", "surrogatepass"), on_gpu_queue, None
    if shape == "json":
        value = draw(json_values)
        return shape, None, None, json.dumps(value).encode("utf-8", "surrogatepass"), \
            on_gpu_queue, None
    if shape == "numbers":  # more digits than Python parses, or deep: never loaded whole
        digits = draw(st.sampled_from((4301, 10_000, 50_000)))
        return shape, None, None, (b'{"headers": {"retries": 1' + b"0" * digits + b"}}"), \
            on_gpu_queue, None
    if shape == "deep":
        depth = draw(st.sampled_from((65, 500, 5000, 100_000)))
        return shape, None, None, b"[" * depth + b"]" * depth, on_gpu_queue, None
    payload, envelope_body, task_id = draw(envelopes())
    body: list[Any] | None = envelope_body
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(ENVELOPE_PATHS))
        value = _DELETE if draw(st.integers(0, 4)) == 0 else draw(
            plausible.get(path, junk))
        if path.startswith("body."):
            if body is None:
                continue  # the body itself was spoiled already
            index = {"args": 0, "kwargs": 1, "embed": 2}[path.split(".")[1]]
            if path.count(".") == 1:
                body[index] = value if value is not _DELETE else None
            elif isinstance(body[2], dict):
                _spoil(body[2], path.split(".", 2)[2], value)
        elif path == "body":
            payload["body"] = value if value is not _DELETE else None
            body = None
        else:
            _spoil(payload, path, value)
    return "envelope", payload, body, b"", on_gpu_queue, task_id


# -- outcomes ----------------------------------------------------------------------------

WRAPPED_MARK = "failed inside the GPU worker: "


@dataclass
class Failure:
    """One distinct failure: its kind, where, what was raised, how often, a reproducer."""

    kind: str
    """``untyped``, ``wrapped``, ``hang``, ``vanished``, ``worker death``, ``follow-up``."""
    key: str
    error: str
    reproducer: str
    count: int = 1


def error_key(task: str, exc: BaseException | str) -> str:
    """What makes two failures the same: the task and the exception's type, and the first
    words of the message with numbers and quoted values blanked."""
    import re

    if isinstance(exc, BaseException):
        text = f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"
    else:
        text = exc
    text = re.sub(r"'[^']*'|\"[^\"]*\"|\d+(\.\d+)?(e[+-]?\d+)?", "_", text)
    return f"{task} {text[:90]}"


def classify(exc: BaseException | None) -> str:
    """``ok``, ``typed``, ``wrapped`` (a built-in's untyped error, wrapped by the worker),
    ``hang`` (no answer in time) or ``untyped``."""
    from celery.exceptions import TimeoutError as CeleryTimeout

    if exc is None:
        return "ok"
    if isinstance(exc, CeleryTimeout):
        return "hang"
    if isinstance(exc, GpuTasksError) and type(exc).__module__ == "gpu_tasks.errors":
        return "wrapped" if WRAPPED_MARK in str(exc) else "typed"
    return "untyped"


@dataclass
class Tally:
    """Counts over a whole fuzzing run, and each distinct failure once (with how often)."""

    examples: int = 0
    cases: int = 0
    requests: int = 0
    raw_messages: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    """Requests: ok / typed / untyped / wrapped / hang. Raw messages: dead-lettered /
    answered / untyped / hang / vanished."""
    errors: Counter[str] = field(default_factory=Counter)
    """Typed errors by class."""
    worker_deaths: int = 0
    follow_up_failures: int = 0
    failures: dict[str, Failure] = field(default_factory=dict)
    seconds: float = 0.0

    def fail(self, kind: str, key: str, error: str, reproducer: str) -> None:
        old = self.failures.get(f"{kind} {key}")
        if old is None:
            self.failures[f"{kind} {key}"] = Failure(kind, key, error, reproducer)
        else:
            old.count += 1
            if len(reproducer) < len(old.reproducer):
                old.reproducer, old.error = reproducer, error

    @property
    def untyped(self) -> int:
        return self.outcomes["untyped"] + self.outcomes["wrapped"] + self.outcomes[
            "raw untyped"]

    @property
    def hangs(self) -> int:
        return self.outcomes["hang"] + self.outcomes["raw hang"] + self.outcomes[
            "raw vanished"]

    @property
    def ok(self) -> bool:
        return not (self.untyped or self.hangs or self.worker_deaths
                    or self.follow_up_failures)

    def summary(self) -> dict[str, Any]:
        return {
            "examples": self.examples, "cases": self.cases, "requests": self.requests,
            "raw_messages": self.raw_messages, "outcomes": dict(self.outcomes),
            "typed_errors": dict(self.errors.most_common()),
            "worker_deaths": self.worker_deaths, "untyped_errors": self.untyped,
            "hangs": self.hangs, "follow_up_failures": self.follow_up_failures,
            "seconds": round(self.seconds, 1),
            "failures": [{"kind": f.kind, "key": f.key, "count": f.count, "error": f.error,
                          "reproducer": f.reproducer}
                         for f in sorted(self.failures.values(), key=lambda f: -f.count)],
        }


# -- the runner --------------------------------------------------------------------------


@dataclass
class Worker:
    """One GPU's worker as the fuzzer watches it: its queue and main process id."""

    queue: str
    pid: int


def children_of(pid: int) -> set[int]:
    """Pids of ``pid``'s child processes, from /proc."""
    found: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2:].split()[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


class Fuzzer:
    """Sends batches to a running cluster (the shared app configured for it) and judges
    them into :attr:`tally`. ``strict``: raise ``AssertionError`` at the end of a batch
    with a failure (a test, so that hypothesis shrinks it); otherwise count and go on."""

    def __init__(self, client: redis.Redis, workers: Sequence[Worker], shard_count: int,
                 owners: dict[int, str], *, timeout_s: float = 30.0, raw_grace_s: float = 3.0,
                 strict: bool = False,
                 restart: Callable[[int], int] | None = None,
                 progress: Callable[[Tally], None] | None = None) -> None:
        self.client = client
        self.workers = list(workers)
        self.shard_count = shard_count
        self.owners = owners
        """Shard index -> owning GPU queue (the map when the run started)."""
        self.timeout_s = timeout_s
        self.raw_grace_s = raw_grace_s
        self.strict = strict
        self.restart = restart
        """Starts GPU ``i``'s worker again after its main process died (as systemd would);
        returns its pid. None: a dead worker stays dead (a test stops at the first death)."""
        self.progress = progress
        """Called after every example (``benchmarks/chaos.py`` prints a line now and then)."""
        self.tally = Tally()
        self._children = {w.queue: children_of(w.pid) for w in self.workers}
        self._started = time.monotonic()

    @property
    def gpu_queues(self) -> list[str]:
        return [w.queue for w in self.workers]

    # -- worker deaths ---------------------------------------------------------------

    def check_workers(self, reproducer: str, needles: Sequence[bytes] = ()) -> list[str]:
        """Worker main processes or pool children that died since the last check. Before
        a dead worker is started again, the messages of the batch (found by ``needles``,
        their ids) are taken out of every queue and every GPU's unacknowledged messages: a
        restarted worker puts back at the head of its queue what its predecessor had
        taken, so the message that killed it would kill it again, and again."""
        deaths = []
        for i, w in enumerate(self.workers):
            if not alive(w.pid):
                purged = self.purge(needles) if self.restart is not None else 0
                deaths.append(f"{w.queue}: the worker's main process {w.pid} died"
                              + (f" ({purged} messages of the batch taken out of the queues "
                                 "before it was started again)" if purged else ""))
                if self.restart is not None:
                    w.pid = self.restart(i)
                    self._children[w.queue] = children_of(w.pid)
                continue
            now = children_of(w.pid)
            gone = self._children[w.queue] - now
            if gone:
                deaths.append(f"{w.queue}: pool child {sorted(gone)} ended "
                              f"(now {sorted(now)})")
            self._children[w.queue] = now
        for death in deaths:
            self.tally.worker_deaths += 1
            self.tally.fail("worker death", death.split(":")[0] + " " + death.split(":")[1]
                            .split()[0], death, reproducer)
        return deaths

    def purge(self, needles: Sequence[bytes]) -> int:
        """Remove every queued or unacknowledged message holding one of ``needles``."""
        needles = [n for n in needles if len(n) >= 8]
        if not needles:
            return 0
        removed = 0
        for w in self.workers:
            key = f"gpu-tasks:unacked:{w.queue}"
            held: Any = self.client.hgetall(key)
            for tag, entry in held.items():
                if any(n in entry for n in needles):
                    removed += int(self.client.hdel(key, tag))
                    self.client.zrem(f"gpu-tasks:unacked_index:{w.queue}", tag)
        queues = [*self.client.scan_iter(match="shard-*", count=1000),
                  *(q.encode() for q in self.gpu_queues)]
        for queue in queues:
            items: Any = self.client.lrange(queue, 0, -1)
            for item in items:
                if any(n in item for n in needles):
                    removed += int(self.client.lrem(queue, 0, item))
        return removed

    # -- requests --------------------------------------------------------------------

    def run_batch(self, entities: int, batch: Sequence[Request]) -> list[str]:
        """Send ``batch``, collect every answer, judge it; returns the failures found."""
        from gpu_tasks.app import app

        self.tally.examples += 1
        tag = uuid.uuid4().hex[:10]
        ids = [f"fuzz-{tag}-{i}" for i in range(entities)]
        sent: list[tuple[int, Request, Any, BaseException | None]] = []
        for n, req in enumerate(batch):
            try:
                sent.append((n, req, self._send(app, req, ids), None))
            except Exception as refused:
                sent.append((n, req, None, refused))
        # Free what the batch allocated, so memory stays bounded (not counted as cases).
        cleanup = [app.send_task("gpu_tasks.free", kwargs={"entity_id": e}) for e in ids]
        deadline = self._wait([r for _n, _q, r, _e in sent],
                              time.monotonic() + self.timeout_s)
        failures: list[str] = []
        died = not all(alive(w.pid) for w in self.workers)
        for n, req, result, at_submit in sent:
            exc = self._collect(result, deadline) if result is not None else at_submit
            if died and classify(exc) == "hang":
                self.tally.outcomes["unanswered: a worker died"] += 1
                continue  # the death is the failure (counted below), not each request
            failures += self._judge(req, exc, batch[: n + 1] if result is not None else [req],
                                    ids, at_submit=result is None)
        for result in cleanup:
            with contextlib.suppress(Exception):
                result.get(timeout=max(0.1, deadline - time.monotonic()), propagate=False)
        self.tally.requests += len(batch)
        self.tally.cases += len(batch)
        deaths = self.check_workers(self._program(batch, ids),
                                    [r.id.encode() for _n, _r, r, _e in sent if r is not None])
        failures += deaths
        self.tally.seconds = time.monotonic() - self._started
        if self.progress is not None:
            self.progress(self.tally)
        if self.strict and failures:
            raise AssertionError("\n".join(failures))
        return failures

    def _send(self, app: Any, req: Request, ids: Sequence[str]) -> Any:
        options: dict[str, Any] = {}
        kwargs = dict(req.kwargs)
        if req.entity is None:
            options["queue"] = self.gpu_queues[req.gpu % len(self.gpu_queues)]
        else:
            kwargs = {"entity_id": req.entity_id if req.odd_entity else ids[req.entity],
                      **kwargs}
        if req.via == "send_task":
            return app.send_task(req.task, kwargs=kwargs, **options)
        return app.tasks[req.task].apply_async(kwargs=kwargs, **options)

    def _wait(self, results: Sequence[Any], deadline: float) -> float:
        """Until every result is ready, a worker's main process dies (its GPU's requests
        would wait out the whole timeout), or ``deadline``; returns the deadline to collect
        them by (now, once a worker died)."""
        pending = [r for r in results if r is not None]
        while pending and time.monotonic() < deadline:
            if not all(alive(w.pid) for w in self.workers):
                return time.monotonic()
            try:
                pending = [r for r in pending if not r.ready()]
            except Exception:
                return deadline
            if pending:
                time.sleep(0.02)
        return deadline

    @staticmethod
    def _collect(result: Any, deadline: float) -> BaseException | None:
        try:
            value = result.get(timeout=max(0.1, deadline - time.monotonic()))
        except Exception as exc:
            return exc
        if not (isinstance(value, dict) and "gpu" in value):
            return TypeError(f"result is not a where-it-ran object: {value!r:.200}")
        return None

    def _program(self, batch: Sequence[Request], ids: Sequence[str],
                 entity: int | None = None) -> str:
        lines = [r.python(ids, self.gpu_queues) for r in batch
                 if entity is None or r.entity == entity or r.entity is None]
        return "\n".join(lines)

    def _judge(self, req: Request, exc: BaseException | None, upto: Sequence[Request],
               ids: Sequence[str], at_submit: bool = False) -> list[str]:
        kind = classify(exc)
        self.tally.outcomes[kind] += 1
        if kind == "typed":
            self.tally.errors[type(exc).__name__] += 1
        if kind in ("ok", "typed"):
            return []
        # The entity's requests up to this one (GPU-queue ones alone): its state is theirs.
        if req.entity is None:
            reproducer = req.python(ids, self.gpu_queues)
        else:
            reproducer = "\n".join(r.python(ids, self.gpu_queues) for r in upto
                                   if r.entity == req.entity)
        assert exc is not None
        text = f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"
        where = "at submit" if at_submit else "answer"
        self.tally.fail(kind, f"{where}: {error_key(req.task, exc)}", text[:2000], reproducer)
        return [f"{kind}: {text[:500]}\nreproducer:\n{reproducer}"]

    # -- raw messages ----------------------------------------------------------------

    def finish_raw(self, drawn: tuple[str, dict[str, Any] | None, list[Any] | None, bytes,
                                      bool, str | None], entity: str) -> RawCase:
        """Encode a drawn raw case, its entity id set to ``entity`` where the body has one."""
        shape, payload, body, raw, on_gpu_queue, task_id = drawn
        if payload is None:
            return RawCase(raw, on_gpu_queue, None, shape)
        if body is not None:
            if isinstance(body, list) and len(body) > 1 and isinstance(body[1], dict):
                task = payload.get("headers", {}).get("task") if isinstance(
                    payload.get("headers"), dict) else None
                if task not in BUILT_IN_GPU_TASKS and "entity_id" not in body[1]:
                    body[1] = {"entity_id": entity, **body[1]}
            encoded = json.dumps(body).encode("utf-8", "surrogatepass")
            payload["body"] = base64.b64encode(encoded).decode()
        needles = []
        for part, name in (("headers", "id"), ("properties", "delivery_tag"),
                           ("properties", "correlation_id"), ("headers", "root_id")):
            section = payload.get(part)
            value = section.get(name) if isinstance(section, dict) else None
            if isinstance(value, str):
                needles.append(json.dumps(value)[1:-1].encode("utf-8", "surrogatepass"))
        return RawCase(json.dumps(payload).encode("utf-8", "surrogatepass"), on_gpu_queue,
                       task_id, shape, tuple(needles))

    def run_raw(self, drawn: Sequence[tuple[str, dict[str, Any] | None, list[Any] | None,
                                            bytes, bool, str | None]],
                gpu: int = 0) -> list[str]:
        """LPUSH each raw message onto the shard queue of an entity of GPU ``gpu`` or onto
        that GPU's own queue, a good request after each; then every raw message must be
        dead-lettered or answered, and every good request answered."""
        from gpu_tasks.app import app

        self.tally.examples += 1
        queue_gpu = self.gpu_queues[gpu % len(self.gpu_queues)]
        entity = self._entity_of(queue_gpu)
        shard = shard_name(shard_index(entity, self.shard_count))
        since = self._dlq_last()
        cases = [self.finish_raw(d, entity) for d in drawn]
        goods = []
        for case in cases:
            queue = queue_gpu if case.on_gpu_queue else shard
            if case.task_id:
                self.client.delete(f"celery-task-meta-{case.task_id}")
            self.client.lpush(queue, case.raw)
            if case.on_gpu_queue:
                goods.append(app.send_task("gpu_tasks.stats", queue=queue_gpu))
            else:
                goods.append(app.send_task("gpu_tasks.alloc", kwargs={
                    "entity_id": entity, "name": "good", "shape": [1]}))
        failures: list[str] = []
        deadline = self._wait(goods, time.monotonic() + self.timeout_s)
        died = not all(alive(w.pid) for w in self.workers)
        for case, good in zip(cases, goods, strict=True):
            exc = self._collect(good, deadline)
            if exc is not None and died:
                self.tally.outcomes["unanswered: a worker died"] += 1
            elif exc is not None:
                self.tally.follow_up_failures += 1
                text = f"{type(exc).__name__}: {exc}"
                repro = self._raw_reproducer(case, queue_gpu, shard)
                self.tally.fail("follow-up", error_key("good request", exc), text, repro)
                failures.append(f"the good request after a raw message failed: {text}\n{repro}")
        grace = time.monotonic() + (0.5 if died else self.raw_grace_s)
        pending = list(cases)
        used: set[str] = set()
        while pending:
            letters = self._dlq_since(since)
            still = []
            for case in pending:
                verdict = self._raw_verdict(case, letters, used)
                if verdict is None:
                    still.append(case)
                else:
                    failures += self._judge_raw(case, verdict, queue_gpu, shard)
            pending = still
            if not pending or time.monotonic() > grace:
                break
            time.sleep(0.05)
        for case in pending:
            if died:  # the messages behind the one that killed the worker wait for it
                self.tally.outcomes["unanswered: a worker died"] += 1
                continue
            failures += self._judge_raw(case, self._where(case, queue_gpu), queue_gpu, shard)
        with contextlib.suppress(Exception):
            app.send_task("gpu_tasks.free", kwargs={"entity_id": entity}).get(timeout=10)
        self.tally.raw_messages += len(cases)
        self.tally.cases += len(cases)
        failures += self.check_workers("\n".join(self._raw_reproducer(c, queue_gpu, shard)
                                                 for c in cases),
                                       [n for c in cases for n in c.needles])
        self.tally.seconds = time.monotonic() - self._started
        if self.progress is not None:
            self.progress(self.tally)
        if self.strict and failures:
            raise AssertionError("\n".join(failures))
        return failures

    def _entity_of(self, gpu_queue: str) -> str:
        for _ in range(10_000):
            entity = f"raw-{uuid.uuid4().hex[:10]}"
            if self.owners.get(shard_index(entity, self.shard_count)) == gpu_queue:
                return entity
        raise AssertionError(f"no entity of {gpu_queue}")

    def _dlq_last(self) -> str:
        rows: Any = self.client.xrevrange(DLQ_KEY, count=1)
        return rows[0][0].decode() if rows else "0-0"

    def _dlq_since(self, since: str) -> dict[str, tuple[bytes, int, str]]:
        """Dead letters after ``since``: id -> (raw bytes kept, raw length, reason)."""
        rows: Any = self.client.xrange(DLQ_KEY, f"({since}", "+")
        letters = {}
        for entry_id, fields in rows:
            entry = json.loads(fields[b"entry"])
            letters[entry_id.decode()] = (base64.b64decode(entry["raw_b64"]),
                                          int(entry["raw_bytes"]), entry["reason"])
        return letters

    def _raw_verdict(self, case: RawCase, letters: dict[str, tuple[bytes, int, str]],
                     used: set[str]) -> tuple[str, str] | None:
        for letter_id, (raw, size, reason) in letters.items():
            if letter_id not in used and size == len(case.raw) and case.raw.startswith(raw):
                used.add(letter_id)  # two equal messages need two dead letters
                return "dead-lettered", reason
        if case.task_id:
            stored: Any = self.client.get(f"celery-task-meta-{case.task_id}")
            if stored is not None:
                return "answered", stored.decode("utf-8", "replace")
        return None

    def _where(self, case: RawCase, gpu_queue: str) -> tuple[str, str]:
        """Where a raw message without a verdict is: held by a worker, queued, or gone."""
        needle = case.task_id.encode() if case.task_id else case.raw[:200]
        for w in self.workers:
            held: Any = self.client.hvals(f"gpu-tasks:unacked:{w.queue}")
            if any(needle in v for v in held):
                return "hang", f"held unanswered by {w.queue}'s worker"
        for key in self.client.scan_iter(match="shard-*", count=1000):
            if any(needle in v for v in self.client.lrange(key, 0, -1)):
                return "hang", f"still queued on {key.decode()}"
        for queue in self.gpu_queues:
            if any(needle in v for v in self.client.lrange(queue, 0, -1)):
                return "hang", f"still queued on {queue}"
        if _asks_for_no_result(case.raw):
            return "answered", "ran or refused without a result: it asked for none"
        return "vanished", "neither dead-lettered nor answered, and in no queue"

    def _judge_raw(self, case: RawCase, verdict: tuple[str, str], gpu_queue: str,
                   shard: str) -> list[str]:
        kind, detail = verdict
        if kind == "answered" and not detail.startswith("{"):
            pass  # ignore_result: true (see _where)
        elif kind == "answered":
            meta = json.loads(detail)
            result = meta.get("result")
            if meta.get("status") == "FAILURE":
                module = result.get("exc_module") if isinstance(result, dict) else None
                exc_type = result.get("exc_type") if isinstance(result, dict) else None
                message = str(result.get("exc_message")) if isinstance(result, dict) else ""
                if module != "gpu_tasks.errors" or WRAPPED_MARK in message:
                    kind, detail = "raw untyped", f"{module}.{exc_type}: {message}"
                else:
                    self.tally.errors[str(exc_type)] += 1
            elif meta.get("status") != "SUCCESS":
                kind, detail = "raw untyped", f"state {meta.get('status')}: {result!r:.300}"
        elif kind in ("hang", "vanished"):
            kind = f"raw {kind}"
        self.tally.outcomes[kind] += 1
        if kind in ("dead-lettered", "answered"):
            return []
        repro = self._raw_reproducer(case, gpu_queue, shard)
        self.tally.fail(kind, error_key(f"raw {case.shape}", detail), detail[:2000], repro)
        return [f"{kind}: {detail[:500]}\nreproducer:\n{repro}"]

    @staticmethod
    def _raw_reproducer(case: RawCase, gpu_queue: str, shard: str) -> str:
        queue = gpu_queue if case.on_gpu_queue else shard
        raw = case.raw if len(case.raw) <= 600 else case.raw[:600] + b"..."
        return f"redis.lpush({queue!r}, {raw!r})  # {len(case.raw)} bytes"


def _asks_for_no_result(raw: bytes) -> bool:
    """A well-formed message with ``ignore_result: true``: Celery stores no answer to it."""
    try:
        headers = json.loads(raw).get("headers")
    except (ValueError, AttributeError):
        return False
    return isinstance(headers, dict) and headers.get("ignore_result") is True


def owners_of(client: redis.Redis) -> tuple[int, dict[int, str]]:
    """``(S, shard index -> owning GPU)`` from the shard map in Redis."""
    from gpu_tasks.control.shardmap import ShardMapStore

    shard_map = ShardMapStore(client).load()
    return shard_map.shard_count, {i: s.owner for i, s in enumerate(shard_map.shards)
                                   if s.owner}
