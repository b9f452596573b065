"""Supervising a deployment on this host: start it, watch it, stop all of it.

``gpu-tasks up`` runs a :class:`~gpu_tasks.local.cluster.LocalCluster` (Redis unless one
is configured, a worker per GPU, Flower) under a :class:`Supervisor`, and any other
command that keeps this host's processes up is to share it. The supervisor starts the
cluster, runs what its caller wants once it serves (``up``: the demo), then watches it: a
worker that exits ends the run with the tail of its log, except one whose GPU's lease
another worker took over (it is let go: that one serves the GPU); SIGTERM or SIGINT ends
it quietly. However the run ends, everything the cluster started is stopped. What happens is
told to a :class:`Listener`: the CLI prints it, a test may record it.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable
from typing import Protocol

from gpu_tasks.control.lease import EXIT_LEASE_LOST
from gpu_tasks.errors import GpuTasksError
from gpu_tasks.local.cluster import LocalCluster, gpu_tasks_command
from gpu_tasks.local.gpus import count_gpus, resolve_backend
from gpu_tasks.local.signals import stop_on_signals
from gpu_tasks.settings import Settings

SIM_GPUS = 4
"""How many sim GPUs a cluster has when nobody says how many."""


class Listener(Protocol):
    """What a supervisor tells as a run goes."""

    def starting(self, cluster: LocalCluster) -> None:
        """The cluster's processes (and Redis, where none is configured) start now."""

    def started(self, cluster: LocalCluster) -> None:
        """Every worker serves, and Flower answers."""

    def watching(self, cluster: LocalCluster) -> None:
        """Up until a signal, or until a worker exits."""

    def let_go(self, cluster: LocalCluster, name: str) -> None:
        """Worker ``name`` exited because another worker took its GPU's lease: the run goes
        on without it (the other serves the GPU)."""

    def stopping(self, cluster: LocalCluster) -> None:
        """A signal came: everything stops now."""

    def stopped(self, cluster: LocalCluster) -> None:
        """Nothing that the cluster started runs any more."""


class Silent:
    """A :class:`Listener` that tells nobody."""

    def starting(self, cluster: LocalCluster) -> None:
        pass

    def started(self, cluster: LocalCluster) -> None:
        pass

    def watching(self, cluster: LocalCluster) -> None:
        pass

    def let_go(self, cluster: LocalCluster, name: str) -> None:
        pass

    def stopping(self, cluster: LocalCluster) -> None:
        pass

    def stopped(self, cluster: LocalCluster) -> None:
        pass


def this_host(settings: Settings, *, gpus: int | None = None, flower: bool = True,
              flower_port: int | None = None) -> LocalCluster:
    """A cluster of this host's GPUs on the settings' backend (``auto``: PyCUDA where it
    and a GPU are present, else sim): ``gpus`` of them, or else every GPU that
    ``nvidia-smi`` lists (:data:`SIM_GPUS` on the sim backend)."""
    backend = resolve_backend(settings.backend)
    if gpus is None:
        gpus = count_gpus() if backend == "pycuda" else SIM_GPUS
    return LocalCluster(settings.replace(backend=backend), gpus=gpus, backend=backend,
                        flower=flower, flower_port=flower_port)


def run_demo(cluster: LocalCluster, entity_count: int) -> int:
    """``gpu-tasks demo`` against ``cluster``, in the foreground (its output is this
    process's); its exit code."""
    return subprocess.call(gpu_tasks_command("demo", "--entities", str(entity_count)),
                           env=cluster.settings.child_env())


class Supervisor:
    """Runs one :class:`LocalCluster` from start to stop (see the module)."""

    def __init__(self, cluster: LocalCluster, listener: Listener | None = None, *,
                 poll_s: float = 1.0) -> None:
        self.cluster = cluster
        self.listener: Listener = listener or Silent()
        self.poll_s = poll_s
        """How often a run looks whether every worker still lives."""

    def run(self, ready: Callable[[LocalCluster], int] | None = None, *,
            stay_up: bool = True) -> int:
        """Start the cluster and call ``ready`` once it serves; then, with ``stay_up``,
        watch it until SIGTERM or SIGINT (0), or else return ``ready``'s code at once.
        Everything is stopped before this returns, or raises :class:`GpuTasksError` for a
        worker that exited while the cluster was up. Main thread only (signals)."""
        cluster, listener = self.cluster, self.listener
        with stop_on_signals(interrupt=True) as stop:
            try:
                listener.starting(cluster)
                cluster.start()
                listener.started(cluster)
                code = ready(cluster) if ready is not None else 0
                if not stay_up:
                    return code
                listener.watching(cluster)
                self.watch(stop)
                listener.stopping(cluster)
            except KeyboardInterrupt:
                listener.stopping(cluster)
            finally:
                stop.set()  # a signal from now on must not cut the stopping short
                cluster.stop()
                listener.stopped(cluster)
        return 0

    def watch(self, stop: threading.Event) -> None:
        """Until ``stop`` is set; :class:`GpuTasksError` once a worker has exited."""
        while True:
            for proc in list(self.cluster.workers):
                if proc.alive():
                    continue
                if proc.popen.returncode == EXIT_LEASE_LOST:
                    # Another worker took this GPU's lease and serves it: stopping the rest
                    # (Redis included) would leave that one without a Redis.
                    self.cluster.workers.remove(proc)
                    self.listener.let_go(self.cluster, proc.name)
                    continue
                raise GpuTasksError(
                    f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
            if stop.wait(self.poll_s):
                return
