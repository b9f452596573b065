"""A whole deployment on this host: Redis, one worker per GPU, Flower.

``gpu-tasks up`` runs one; the test suite runs one per session. Every process
is started the way an operator would start it (``gpu-tasks worker --gpu I``,
``gpu-tasks flower``), in its own process group so :meth:`LocalCluster.stop` can
take down each one with everything it forked, leaving nothing running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

from gpu_tasks.control.failover import Failover, fail_over
from gpu_tasks.control.fleet import FleetRegistry
from gpu_tasks.control.lease import LeaseStore
from gpu_tasks.control.shardmap import ShardMap, ShardMapStore
from gpu_tasks.errors import GpuTasksError
from gpu_tasks.local.private import (
    REDIS_PASSWORD_FILE,
    REDIS_URL_FILE,
    private_dir,
    secret,
    session_auth,
    write_private,
)
from gpu_tasks.local.redis_server import RedisServer, free_port
from gpu_tasks.monitor.flower import AUTH_SETTING, FlowerAuth, parse_basic_auth
from gpu_tasks.protocol.routing import gpu_queue
from gpu_tasks.settings import Settings


@dataclass
class Process:
    """A child we started: its command, process and log."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes] = field(repr=False)
    started_at: float = field(default_factory=time.time)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def signal_group(self, sig: int) -> None:
        """Signal the process and everything it forked (its process group)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)


def spawn(name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> Process:
    """Start ``argv`` in its own process group, output to ``log_dir/<name>.log``."""
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "ab")  # noqa: SIM115  (closed by whoever stops it)
    popen = subprocess.Popen(argv, env={**env, "PYTHONUNBUFFERED": "1"},
                             stdin=subprocess.DEVNULL, stdout=log_file,
                             stderr=subprocess.STDOUT, start_new_session=True)
    return Process(name, popen, log_path, log_file)


def gpu_tasks_command(*args: str) -> list[str]:
    """The ``gpu-tasks`` CLI as a command line, with this interpreter."""
    return [sys.executable, "-m", "gpu_tasks.cli", *args]


class LocalCluster:
    """Redis (embedded unless ``settings.redis_url`` is set), GPU workers and Flower."""

    def __init__(
        self,
        settings: Settings,
        *,
        gpus: int,
        backend: str = "sim",
        flower: bool = True,
        flower_port: int | None = None,
        log_dir: str | Path | None = None,
    ) -> None:
        if gpus < 1:
            raise GpuTasksError(
                f"a cluster needs at least one GPU, not {gpus}"
                + (" (nvidia-smi lists no GPU on this host; try --backend sim)"
                   if backend == "pycuda" else ""))
        # With Flower watching, workers send task events from their first request on:
        # Flower would switch them on only seconds after it starts, and `up`'s demo
        # would be over by then, never shown.
        self.settings = settings.replace(task_events=True) if flower else settings
        self.gpus = gpus
        self.backend = backend
        self.want_flower = flower
        self.flower_port = flower_port
        self.flower_auth: FlowerAuth | None = None
        """Flower's credentials: the settings' (``GPU_TASKS_FLOWER_BASIC_AUTH``), or a
        password made for this run and written to :attr:`flower_credentials_file`."""
        self.flower_credentials_file: Path | None = None
        self.log_dir = Path(log_dir or Path(settings.data_dir) / "logs").resolve()
        self.redis: RedisServer | None = None
        self.adopted: list[Failover] = []
        """This node's GPUs that the shard map names but this run does not start (an earlier
        run had more), failed over to the ones it does (:meth:`adopt_orphans`)."""
        self.redis_url_file: Path | None = None
        """Where the embedded Redis's URL, with its password, is (mode 0600): for a user's
        other shells (``export GPU_TASKS_REDIS_URL=$(cat ...)``); never printed."""
        self.workers: list[Process] = []
        self.flower: Process | None = None

    @property
    def queues(self) -> list[str]:
        """This cluster's GPUs, by their queue names (``gpu.<node>.<i>``)."""
        return [gpu_queue(self.settings.node, i) for i in range(self.gpus)]

    @property
    def flower_url(self) -> str | None:
        return f"http://127.0.0.1:{self.flower_port}" if self.flower else None

    # -- lifecycle ------------------------------------------------------------------

    def start(self, timeout_s: float = 60.0) -> LocalCluster:
        try:
            private_dir(Path(self.settings.data_dir))
            self.log_dir.mkdir(parents=True, exist_ok=True)
            if not self.settings.redis_url:
                data_dir = Path(self.settings.data_dir)
                self.redis = RedisServer(data_dir / "redis",
                                         password=secret(data_dir / REDIS_PASSWORD_FILE)).start()
                self.settings = self.settings.replace(redis_url=self.redis.url)
                self.redis_url_file = write_private(data_dir / REDIS_URL_FILE,
                                                    self.redis.url + "\n")
            self.ensure_shard_map()
            for i in range(self.gpus):
                self.workers.append(self.start_worker(i))
            if self.want_flower:
                self.start_flower()
            self.wait_ready(timeout_s)
            self.adopt_orphans()
        except BaseException:
            self.stop()
            raise
        return self

    def ensure_shard_map(self) -> bool:
        """Create a balanced map over this node's GPUs if there is none; True if created."""
        store = ShardMapStore(self.settings.redis_client())
        if store.exists():
            return False
        try:
            store.create(ShardMap.balanced(self.queues, self.settings.shard_count))
        except GpuTasksError:
            if not store.exists():
                raise
            return False  # another process made it first
        return True

    def start_worker(self, gpu_index: int) -> Process:
        return self._spawn(
            f"worker-{gpu_index}",
            gpu_tasks_command("worker", "--gpu", str(gpu_index), "--backend", self.backend),
        )

    def start_flower(self) -> None:
        """``gpu-tasks flower`` on loopback, with the settings' credentials or, where there
        are none, a random password for this run in ``<data_dir>/flower-credentials``."""
        self.flower_port = self.flower_port or free_port()
        if self.settings.flower_basic_auth:
            self.flower_auth = FlowerAuth(parse_basic_auth(self.settings.flower_basic_auth),
                                          AUTH_SETTING)
        else:
            self.flower_auth, self.flower_credentials_file = session_auth(
                self.settings.data_dir)
        # The credentials travel in the environment, never on a command line (`ps`).
        settings = self.settings.replace(flower_basic_auth=self.flower_auth.basic_auth)
        self.flower = spawn(
            "flower",
            gpu_tasks_command("flower", f"--port={self.flower_port}", "--address=127.0.0.1"),
            settings.child_env(),
            self.log_dir,
        )

    def adopt_orphans(self) -> list[Failover]:
        """Give the shards of this node's GPUs that the map names, that this run does not
        start and that no worker serves (an earlier run on the same data had more GPUs) to
        the GPUs it does start, with their waiting work first, as failover does: else their
        requests would wait for a consumer that never comes. Their device state went with
        the run that held it; failover records it as lost (``EntityStateLost``)."""
        client = self.settings.redis_client()
        leases = LeaseStore(client)
        mine = f"gpu.{self.settings.node}."
        orphans = [gpu for gpu in ShardMapStore(client).load().by_owner()
                   if gpu is not None and gpu.startswith(mine) and gpu not in self.queues
                   and not leases.alive(gpu)]
        self.adopted = [fail_over(client, gpu) for gpu in sorted(orphans)]
        return self.adopted

    def wait_ready(self, timeout_s: float) -> None:
        """Until every GPU's worker holds its lease and consumes by the current shard map,
        its device is open, and Flower answers."""
        client = self.settings.redis_client()
        fleet, leases, maps = FleetRegistry(client), LeaseStore(client), ShardMapStore(client)
        deadline = time.monotonic() + timeout_s
        started_at = (
            time.time() - timeout_s if not self.workers else min(p.started_at for p in self.workers)
        )
        pending = set(self.queues)
        while pending or (self.flower is not None and not self._flower_answers()):
            for proc in [*self.workers, *([self.flower] if self.flower else [])]:
                if not proc.alive():
                    raise GpuTasksError(
                        f"{proc.name} exited with {proc.popen.returncode} "
                        f"while starting:\n{proc.log_tail()}"
                    )
            epoch = maps.epoch()
            for queue in list(pending):
                lease, record = leases.get(queue), fleet.get(queue)
                # A record from an earlier run may still be there: it must be this run's.
                if (lease is not None and lease.epoch == (-1 if epoch is None else epoch)
                        and record is not None and record.started_at >= started_at):
                    pending.discard(queue)
            if time.monotonic() > deadline:
                waiting = ", ".join(sorted(pending)) or "flower"
                raise GpuTasksError(
                    f"not ready after {timeout_s}s: {waiting}; logs in {self.log_dir}"
                )
            time.sleep(0.1)

    def _flower_answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.flower_url}/healthcheck", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM each process we started (a Celery worker finishes its running task:
        signalling its whole group would kill the pool child mid-task), then SIGKILL its
        group, taking what is left of it; then stop Redis."""
        procs = [p for p in [*self.workers, self.flower] if p is not None]
        for proc in procs:
            if proc.alive():
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            proc.signal_group(signal.SIGKILL)
            if proc.popen.poll() is None:
                proc.popen.wait()
            proc.log_file.close()
        self.workers, self.flower = [], None
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def _spawn(self, name: str, argv: list[str]) -> Process:
        return spawn(name, argv, self.settings.child_env(), self.log_dir)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
