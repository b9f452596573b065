"""GPU leases: which worker serves each GPU, judged on Redis's clock.

A GPU worker's main process (the one that fetches messages) takes its GPU's lease
before it consumes anything and renews it every ``map_poll_s``. The lease is a
Redis key with a time to live, so a worker that stops renewing it (killed, frozen,
cut off) loses it after ``lease_ttl_s`` by Redis's clock, whatever the hosts'
clocks say. A second worker for the same GPU finds the lease taken and refuses to
start; a restarted worker takes it over at once when the old holder ran on the
same host and its process is gone, otherwise when the lease expires.

Layout in Redis:

- ``gpu-tasks:lease:<gpu>``  hash, expiring: ``token`` (one per worker process),
  ``worker``, ``host``, ``pid``, ``pid_start``, ``boot_id``, ``acquired_ms`` and
  ``renewed_ms`` (Redis ``TIME``), ``ttl_ms``, ``epoch`` (the shard map epoch the
  worker consumes by; -1 before it has read one) and ``consuming`` (how many shard
  queues it consumes)
- ``gpu-tasks:leases``       set of every GPU that has held a lease
- ``gpu-tasks:lease-seen``   hash ``<gpu>`` -> when its lease was last renewed (ms, Redis
  time): kept after the lease expires, so failover knows for how long a GPU has been gone
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from gpu_tasks.control import scripts
from gpu_tasks.errors import LeaseHeld
from gpu_tasks.keys import LEASE_KEY, LEASES_KEY, META_KEY, SEEN_KEY

EXIT_LEASE_LOST = 3
"""Exit status of a worker whose GPU lease another worker took over: that one serves the
GPU now, so a supervisor lets this one go instead of restarting it against the holder (the
systemd units say RestartPreventExitStatus=3)."""

log = logging.getLogger(__name__)


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot, from /proc), or "" if unknown:
    with the pid it tells a live holder from a new process that reused its pid."""
    stat = _read(f"/proc/{pid}/stat")
    return stat[stat.rindex(")") + 2 :].split()[19] if ")" in stat else ""


def process_gone(host: str, pid: int, pid_start: str = "", boot_id: str = "") -> bool | None:
    """Whether process ``pid`` of ``host`` is known to be gone: True or False on this host,
    None (unknown) elsewhere. ``pid_start`` and ``boot_id`` tell a reused pid or a rebooted
    host from the process itself."""
    if host != socket.gethostname():
        return None
    if boot_id and boot_id != _read("/proc/sys/kernel/random/boot_id"):
        return True  # this host has rebooted since
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    return bool(pid_start) and process_start(pid) != pid_start


@dataclass(frozen=True)
class Holder:
    """One worker process that holds, or wants, a GPU's lease."""

    worker: str
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    pid_start: str = ""
    boot_id: str = field(default_factory=lambda: _read("/proc/sys/kernel/random/boot_id"))

    def __post_init__(self) -> None:
        if not self.pid_start:
            object.__setattr__(self, "pid_start", process_start(self.pid))

    def fields(self) -> list[str | int]:
        return ["worker", self.worker, "host", self.host, "pid", self.pid,
                "pid_start", self.pid_start, "boot_id", self.boot_id]


@dataclass(frozen=True)
class Lease:
    """A lease as read from Redis, with Redis's clock at the time of reading."""

    gpu: str
    token: str
    worker: str
    host: str
    pid: int
    pid_start: str
    boot_id: str
    acquired_ms: int
    renewed_ms: int
    ttl_ms: int
    epoch: int
    consuming: int
    now_ms: int

    @property
    def age_s(self) -> float:
        """Seconds since the holder last renewed it, by Redis's clock."""
        return max(0, self.now_ms - self.renewed_ms) / 1000

    @property
    def expires_in_s(self) -> float:
        return max(0, self.renewed_ms + self.ttl_ms - self.now_ms) / 1000

    def holder_gone(self) -> bool | None:
        """Whether the holder's process is known to be gone: True or False when it ran on
        this host, None (unknown) when it ran elsewhere."""
        return process_gone(self.host, self.pid, self.pid_start, self.boot_id)

    def describe(self) -> str:
        return (f"{self.worker} (pid {self.pid} on {self.host}, lease renewed "
                f"{self.age_s:.1f}s ago)")

    @classmethod
    def from_hash(cls, gpu: str, raw: dict[bytes, bytes], now_ms: int) -> Lease:
        d = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(gpu=gpu, token=d.get("token", ""), worker=d.get("worker", ""),
                   host=d.get("host", ""), pid=int(d.get("pid", 0)),
                   pid_start=d.get("pid_start", ""), boot_id=d.get("boot_id", ""),
                   acquired_ms=int(d.get("acquired_ms", 0)),
                   renewed_ms=int(d.get("renewed_ms", 0)), ttl_ms=int(d.get("ttl_ms", 0)),
                   epoch=int(d.get("epoch", -1)), consuming=int(d.get("consuming", 0)),
                   now_ms=now_ms)


def redis_now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


@dataclass(frozen=True)
class Renewal:
    """What a claim or renewal answered."""

    held: bool
    """Whether this holder has the lease now."""
    map_epoch: int = -1
    """The shard map's epoch at that moment (-1: no map)."""
    holder_token: str = ""
    """The token of whoever holds it, when it is not us."""


class LeaseStore:
    """Reads and changes leases. One Lua script claims, renews and re-takes a lease."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._claim = scripts.register(client, "lease_claim")
        self._release = scripts.register(client, "lease_release")

    def claim(
        self, gpu: str, holder: Holder, ttl_s: float, *, replacing: str = "",
        epoch: int = -1, consuming: int = 0,
    ) -> Renewal:
        """Take or renew ``gpu``'s lease for ``holder`` (also when it expired meanwhile and
        nobody else took it), unless someone other than ``replacing`` holds it."""
        reply = self._claim(
            keys=[LEASE_KEY.format(gpu=gpu), LEASES_KEY, META_KEY, SEEN_KEY],
            args=[holder.token, int(ttl_s * 1000), replacing, gpu, *holder.fields(),
                  "epoch", epoch, "consuming", consuming],
        )
        if int(reply[0]) == 1:
            return Renewal(True, int(reply[2]))
        token = reply[1]
        return Renewal(False, holder_token=token.decode() if isinstance(token, bytes) else token)

    def release(self, gpu: str, token: str) -> bool:
        """Give the lease up (a clean stop): True if it was ours."""
        return bool(self._release(keys=[LEASE_KEY.format(gpu=gpu), SEEN_KEY],
                                  args=[token, gpu]))

    def get(self, gpu: str) -> Lease | None:
        pipe = self.client.pipeline(transaction=True)
        pipe.time()
        pipe.hgetall(LEASE_KEY.format(gpu=gpu))
        (seconds, micros), raw = pipe.execute()
        if not raw:
            return None
        return Lease.from_hash(gpu, raw, int(seconds) * 1000 + int(micros) // 1000)

    def alive(self, gpu: str) -> bool:
        """Whether a worker serves ``gpu``: it holds the lease and its process is not known
        to be gone (a SIGKILLed worker's lease outlives it by up to its TTL)."""
        lease = self.get(gpu)
        return lease is not None and not lease.holder_gone()

    def gone_for_s(self, gpu: str) -> float | None:
        """How long ``gpu``'s lease has been expired, by Redis's clock: None while it is held
        (or if it never was), 0.0 if released by a clean stop."""
        pipe = self.client.pipeline(transaction=True)
        pipe.time()
        pipe.exists(LEASE_KEY.format(gpu=gpu))
        pipe.hget(SEEN_KEY, gpu)
        (seconds, micros), held, until = pipe.execute()
        if held or until is None:
            return None
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        return max(0.0, (now_ms - int(until)) / 1000)

    def all(self) -> dict[str, Lease | None]:
        """Every GPU that has held a lease, with its lease now (None: expired or released)."""
        gpus = sorted(g.decode() if isinstance(g, bytes) else g
                      for g in self.client.smembers(LEASES_KEY))
        pipe = self.client.pipeline(transaction=True)
        pipe.time()
        for gpu in gpus:
            pipe.hgetall(LEASE_KEY.format(gpu=gpu))
        (seconds, micros), *raws = pipe.execute()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        return {gpu: Lease.from_hash(gpu, raw, now_ms) if raw else None
                for gpu, raw in zip(gpus, raws, strict=True)}

    def take(
        self, gpu: str, holder: Holder, ttl_s: float, *, poll_s: float = 0.2,
        sleep: Callable[[float], None] = time.sleep,
    ) -> Renewal:
        """Take ``gpu``'s lease for a starting worker, or raise :class:`LeaseHeld`.

        Free: taken. Held by a process of this host that is gone: taken over at once.
        Held by a live process of this host, or by one elsewhere that renews it while we
        watch: refused. Held elsewhere and not renewed: taken when it expires."""
        first_seen: Lease | None = None
        deadline = time.monotonic() + ttl_s + 2 * poll_s
        while True:
            granted = self.claim(gpu, holder, ttl_s)
            if granted.held:
                return granted
            current = self.get(gpu)
            if current is None or current.token != granted.holder_token:
                continue  # it expired or changed hands meanwhile: try again at once
            gone = current.holder_gone()
            if gone:
                taken = self.claim(gpu, holder, ttl_s, replacing=current.token)
                if taken.held:
                    log.warning("%s: took over the lease of %s, whose process is gone",
                                gpu, current.describe())
                    return taken
                continue
            if gone is False:
                raise LeaseHeld(
                    f"{gpu} is already served by {current.describe()}: one worker per GPU. "
                    "Stop that worker first (a restarted worker takes over once it is gone)"
                )
            if first_seen is None:
                first_seen = current
                log.warning("%s: lease held by %s; waiting up to %.0fs for it to expire",
                            gpu, current.describe(), current.expires_in_s)
            elif current.renewed_ms != first_seen.renewed_ms or time.monotonic() > deadline:
                raise LeaseHeld(
                    f"{gpu} is already served by {current.describe()}, which keeps renewing "
                    "its lease: one worker per GPU. Stop that worker first, or check that "
                    "GPU_TASKS_NODE differs between hosts"
                )
            sleep(min(poll_s, max(0.01, current.expires_in_s)))
