"""Settings: read once from ``GPU_TASKS_*`` environment variables into a frozen object.

This is the only module that reads the environment. CLI flags override fields
with :meth:`Settings.replace`; child processes the CLI starts receive the
effective settings back as environment variables (:meth:`Settings.to_env`).
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from gpu_tasks import redisurl
from gpu_tasks.errors import ConfigError
from gpu_tasks.redisurl import redacted_url

ENV_PREFIX = "GPU_TASKS_"
BACKENDS = ("auto", "pycuda", "sim")


def _short_hostname() -> str:
    return socket.gethostname().split(".")[0] or "localhost"


def parse_size(text: str) -> int:
    """Parse a byte size such as ``1073741824``, ``512MiB`` or ``1GiB``."""
    units = {
        "": 1,
        "b": 1,
        "kib": 1 << 10,
        "mib": 1 << 20,
        "gib": 1 << 30,
        "tib": 1 << 40,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
        "tb": 10**12,
    }
    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("kmgtib")
    unit = raw[len(number) :]
    if unit not in units or not number:
        raise ConfigError(f"cannot read {text!r} as a size (examples: 1073741824, 512MiB, 1GiB)")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise ConfigError(f"cannot read {text!r} as a size") from None
    if value <= 0:
        raise ConfigError(f"size {text!r} must be positive")
    return int(value)


@dataclass(frozen=True)
class Settings:
    """Everything a producer or worker needs to know, with units in the names."""

    redis_url: str | None = field(default=None, repr=False)
    """Broker, result backend, shard map and fleet registry: ``redis://``, ``rediss://``
    (TLS) or ``sentinel://`` (forms in :mod:`gpu_tasks.redisurl`). None:
    ``gpu-tasks up`` starts an embedded redis-server; other commands refuse. May hold a
    password: never printed, logged or shown in ``repr`` (:attr:`redis_url_shown` is)."""
    node: str = field(default_factory=_short_hostname)
    """This host's name in queue and worker names: ``gpu.<node>.<i>``, ``gpu<i>@<node>``."""
    shard_count: int = 1024
    """S for a new shard map; an existing map keeps the S it was created with."""
    backend: str = "auto"
    """Device backend for workers: ``pycuda``, ``sim``, or ``auto`` (pycuda if a GPU is seen)."""
    sim_memory_bytes: int = 1 << 30
    """Capacity of each simulated GPU."""
    entity_memory_bytes: int = 0
    """Most device memory one entity may hold on a GPU; 0 means no quota."""
    entity_idle_s: float = 600.0
    """An entity unused this long has its buffers spilled to host memory (restored on its
    next request); 0 never spills idle entities (memory pressure still does)."""
    spill_memory_bytes: int = 4 << 30
    """Host memory a GPU worker may hold spilled buffers in; an entity that would not fit
    there is evicted instead (its buffers answer EntityStateLost)."""
    lease_ttl_s: float = 10.0
    """How long a GPU worker's lease on its GPU lasts unless renewed. A worker that stops
    renewing it (killed, frozen, cut off from Redis) stops executing and counts as gone
    after this; a restarted worker on another host waits at most this long to take over."""
    map_poll_s: float = 0.25
    """How often a GPU worker's main process renews its lease and checks the shard map's
    epoch: it starts and stops consuming shard queues within this plus one BRPOP (0.25 s)."""
    heartbeat_s: float = 2.0
    """How often a worker writes its device accounting to the fleet registry."""
    redis_timeout_s: float = 5.0
    """Longest a call to Redis may block: gpu-tasks' own clients (shard map, leases, fleet
    registry) use it as their connect and socket timeout, and a producer's ``apply_async``
    (broker publish, result reads) fails with ``BrokerUnavailable`` within it when Redis is
    down or hung, instead of blocking a web request."""
    max_backlog: int = 100_000
    """``gpu-tasks batch`` slows down (or with ``--fail-fast`` stops) while a GPU it sends to
    has more requests than this waiting in its shard queues."""
    batch_record_ttl_s: float = 7 * 24 * 3600.0
    """How long ``gpu-tasks batch`` remembers which lines of a batch it sent: re-running the
    same batch within this sends nothing twice."""
    max_message_bytes: int = 16 << 20
    """Largest request ``gpu-tasks batch`` and ``gpu_tasks.submit.bulk`` send (the encoded message);
    GPU workers dead-letter larger ones."""
    # -- poison messages (gpu_tasks.control.deadletter); GPU workers also refuse messages over
    # max_message_bytes, dead-lettering them.
    max_nesting: int = 64
    """Deepest nesting of arrays and objects a GPU worker accepts in a message (envelope or
    body); deeper ones are dead-lettered before anything recurses over them."""
    max_child_deaths: int = 3
    """A request whose execution ends the worker's pool child this many times is
    dead-lettered instead of being run again."""
    # -- the batched fetch (workers.consumer.fetch)
    fetch_max_requests: int = 64
    """Most requests a GPU worker takes from its shard queues in one Redis call and hands
    its pool child as one batch."""
    fetch_max_bytes: int = 8 << 20
    """Most bytes of messages in one batch; a larger message is taken alone."""
    fetch_wait_s: float = 0.0
    """How long a worker that took fewer than ``fetch_max_requests`` waits for more before
    handing them over (Triton's max queue delay): 0 runs a request at once."""
    fetch_idle_poll_s: float = 1.0
    """An idle worker takes at least this often, whatever its doorbell said (pub/sub is at
    most once): the longest a missed wake-up delays a request."""
    device_open_timeout_s: float = 120.0
    """How long a GPU worker waits for a new pool child to open its device (cuInit, the
    context, the checks) before killing and replacing it; Celery's 4 s default is too short
    for cuInit without persistence mode, and the child would be replaced in a loop."""
    task_time_limit_s: float = 300.0
    """Hard time limit of one device task: past it the pool child is killed and replaced,
    and every entity's buffers on that GPU are lost (answered ``EntityStateLost``). A task
    may set its own (``@gpu_task(time_limit=...)``, ``apply_async(time_limit=...)``)."""
    task_soft_time_limit_s: float = 240.0
    """Soft time limit of one device task: past it the task is interrupted where it runs
    Python code and answered ``TaskTimeLimitExceeded``, and the GPU keeps its buffers. Must
    be below the hard limit, so a task gets the chance to stop before its child is killed.
    A task may set its own (``soft_time_limit=``)."""
    visibility_timeout_s: float = 3600.0
    """Redis visibility timeout; must exceed the longest task (checked)."""
    fault_injection: bool = False
    """Allow the ``fault`` kernel, which breaks a GPU's context on purpose (and so drops
    every entity's buffers on that GPU). For recovery drills and tests only."""
    failover_after_s: float = 30.0
    """How long a GPU's lease must have been expired before the coordinator fails it over
    (gives its shards, and the work it had taken, to live GPUs)."""
    handoff_pause: str = ""
    """For drills and tests: ``<step>:<seconds>`` makes a handoff driver pause that long
    after the step (``releasing``, ``exported``, ``importing``, ``imported``, ``owned``),
    so that a process can be killed there."""
    imports: tuple[str, ...] = ()
    """Extra modules a worker imports, where users' own ``@gpu_task`` tasks live."""
    data_dir: str = ".gpu-tasks"
    """Where ``gpu-tasks up`` keeps the embedded Redis data and logs."""
    log_level: str = "WARNING"
    """Worker log level. Celery's default: INFO adds two log lines to every task."""
    task_events: bool = False
    """GPU workers send task events (received, started, succeeded, failed) from their first
    task on, so Flower shows every request. Set it wherever Flower watches the deployment
    (``gpu-tasks up`` does, when it starts Flower): Flower switches events on itself only
    every few seconds after it starts, missing what ran before. Costs each request about
    as much as a trivial task."""
    # -- Limits on what one request or one entity may ask of a GPU worker (each refusal is a
    # BadRequest naming the field, or a RoutingError at submit time for the entity id).
    max_read_bytes: int = 64 << 20
    """Most data one ``read`` returns as ``data_b64`` (the result travels through Redis, and
    is held several times over while it is encoded); read a larger buffer in parts with
    ``offset``/``count``."""
    max_read_values: int = 1_000_000
    """Most elements one ``read`` with ``as_list`` returns: a Python list costs a worker
    tens of bytes per element on top of its JSON."""
    max_buffers_per_entity: int = 1024
    """Most buffers one entity may hold on a GPU (its bytes: ``entity_memory_bytes``)."""
    max_entity_id_chars: int = 1024
    """Longest entity id producers send and GPU workers accept, in characters."""
    flower_basic_auth: str = field(default="", repr=False)
    """``USER:PASSWORD`` (several: comma-separated) that ``gpu-tasks flower`` requires for
    Flower's pages and REST API. A secret: never printed, logged or shown in ``repr``."""

    def __post_init__(self) -> None:
        if self.redis_url:
            redisurl.parse(self.redis_url)  # a malformed URL fails here, saying why
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.shard_count < 1:
            raise ConfigError(f"shard_count must be at least 1, not {self.shard_count}")
        if not self.node or any(c in self.node for c in ".@ \t"):
            raise ConfigError(f"node {self.node!r} must be non-empty without '.', '@' or spaces")
        if self.visibility_timeout_s <= self.task_time_limit_s:
            raise ConfigError(
                f"visibility_timeout_s ({self.visibility_timeout_s}) must exceed "
                f"task_time_limit_s ({self.task_time_limit_s}), or Redis redelivers running tasks"
            )
        if self.task_soft_time_limit_s >= self.task_time_limit_s:
            raise ConfigError(
                f"task_soft_time_limit_s ({self.task_soft_time_limit_s}) must be below "
                f"task_time_limit_s ({self.task_time_limit_s}): past the hard limit the pool "
                "child is killed, and the GPU's buffers with it"
            )
        if self.map_poll_s * 4 > self.lease_ttl_s:
            raise ConfigError(
                f"lease_ttl_s ({self.lease_ttl_s}) must be at least 4 x map_poll_s "
                f"({self.map_poll_s}): the lease is renewed every map_poll_s"
            )
        for name in ("lease_ttl_s", "map_poll_s", "heartbeat_s", "redis_timeout_s",
                     "device_open_timeout_s", "failover_after_s", "task_time_limit_s",
                     "task_soft_time_limit_s", "sim_memory_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, not {getattr(self, name)}")
        for name in ("fetch_max_requests", "fetch_max_bytes", "fetch_idle_poll_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, not {getattr(self, name)}")
        if self.fetch_wait_s < 0:
            raise ConfigError(f"fetch_wait_s must not be negative, not {self.fetch_wait_s}")
        for name in ("max_backlog", "batch_record_ttl_s", "max_message_bytes", "max_nesting",
                     "max_child_deaths", "max_read_bytes", "max_read_values",
                     "max_buffers_per_entity", "max_entity_id_chars"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, not {getattr(self, name)}")
        for name in ("entity_idle_s", "spill_memory_bytes", "entity_memory_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, not {getattr(self, name)}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``GPU_TASKS_<FIELD>`` variables; unset ones keep defaults."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(env_name(f.name))
            if raw is None or raw == "":
                continue
            values[f.name] = _convert(f.name, raw)
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied; None values are ignored (unset CLI flags)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_env(self) -> dict[str, str]:
        """These settings as environment variables, for child processes."""
        env: dict[str, str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            env[env_name(f.name)] = (
                ",".join(value) if isinstance(value, tuple) else str(value)
            )
        return env

    def child_env(self) -> dict[str, str]:
        """This process's environment with these settings in it, for a child process."""
        return {**os.environ, **self.to_env()}

    def redis_client(self) -> redis.Redis:
        """A client for the deployment's Redis (shard map, leases, fleet registry, queues),
        with :attr:`redis_timeout_s` as its connect and socket timeout: of the current
        master where the URL names Sentinels, with TLS and the login the URL says."""
        return self.redis_target().client(self.redis_timeout_s)

    def redis_target(self) -> redisurl.RedisTarget:
        """The Redis URL, read (:mod:`gpu_tasks.redisurl`)."""
        return redisurl.parse(self.require_redis_url())

    def require_redis_url(self) -> str:
        if not self.redis_url:
            raise ConfigError(
                "no Redis configured: set GPU_TASKS_REDIS_URL or pass --redis-url "
                "(or run `gpu-tasks up`, which starts its own)"
            )
        return self.redis_url

    @property
    def redis_url_shown(self) -> str:
        """The Redis URL as output may show it: without its password."""
        return redacted_url(self.redis_url) if self.redis_url else "(not set)"


# Sizes take units ("512MiB"), so their variables drop the _BYTES of the field name.
_ENV_NAMES = {"sim_memory_bytes": "GPU_TASKS_SIM_MEMORY",
              "fetch_max_bytes": "GPU_TASKS_FETCH_MAX_SIZE",
              "max_message_bytes": "GPU_TASKS_MAX_MESSAGE",
              "max_read_bytes": "GPU_TASKS_MAX_READ",
              "entity_memory_bytes": "GPU_TASKS_ENTITY_MEMORY",
              "spill_memory_bytes": "GPU_TASKS_SPILL_MEMORY"}


def env_name(field_name: str) -> str:
    """The environment variable of a settings field: ``GPU_TASKS_<FIELD>``."""
    return _ENV_NAMES.get(field_name, ENV_PREFIX + field_name.upper())


_INT_FIELDS = {"shard_count", "max_backlog", "max_nesting", "max_child_deaths",
               "fetch_max_requests",
               "max_read_values", "max_buffers_per_entity", "max_entity_id_chars"}
_SIZE_FIELDS = {"sim_memory_bytes", "entity_memory_bytes", "spill_memory_bytes",
                "max_message_bytes", "max_read_bytes", "fetch_max_bytes"}
_BOOL_FIELDS = {"fault_injection", "task_events"}
_FLOAT_FIELDS = {"entity_idle_s", "lease_ttl_s", "map_poll_s", "heartbeat_s",
                 "redis_timeout_s", "device_open_timeout_s", "failover_after_s",
                 "task_time_limit_s", "task_soft_time_limit_s", "visibility_timeout_s",
                 "batch_record_ttl_s", "fetch_wait_s", "fetch_idle_poll_s"}


def _convert(name: str, raw: str) -> Any:
    var = env_name(name)
    try:
        if name in _INT_FIELDS:
            return int(raw)
        if name in _FLOAT_FIELDS:
            return float(raw)
    except ValueError:
        raise ConfigError(f"{var}={raw!r} is not a number") from None
    if name in _SIZE_FIELDS:
        if raw.strip() == "0":
            return 0
        try:
            return parse_size(raw)
        except ConfigError as exc:
            raise ConfigError(f"{var}: {exc}") from None
    if name in _BOOL_FIELDS:
        if raw.strip().lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ConfigError(f"{var}={raw!r} is not a boolean (use 1/0, true/false)")
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if name == "imports":
        return tuple(m.strip() for m in raw.split(",") if m.strip())
    return raw


_current: Settings | None = None


def current() -> Settings:
    """The process's settings: read from the environment on first use, then fixed."""
    global _current
    if _current is None:
        _current = Settings.from_env()
    return _current


def use(settings: Settings) -> None:
    """Make ``settings`` the process's settings (the CLI, after applying its flags)."""
    global _current
    _current = settings
