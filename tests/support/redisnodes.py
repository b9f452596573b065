"""Redis deployments the tests build on loopback: a server with a password, an ACL file or
TLS, and a master with a replica watched by three Sentinels; TLS certificates made with
``openssl``. Every process is ours, on a free port (never 6379), and stopped at the end."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

from gpu_tasks.local.redis_server import find_redis_server
from tests.conftest import wait_until
from tests.support.ports import free_port


class Node:
    """One ``redis-server`` (or ``redis-server --sentinel``) process we started."""

    def __init__(self, name: str, directory: Path, args: Sequence[str],
                 admin: Callable[[], redis.Redis], port: int) -> None:
        self.name = name
        self.directory = directory
        self.args = list(args)
        self.admin = admin
        """A client with every right, to check the node is up (and for the test)."""
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / f"{self.name}.log"

    def start(self, timeout_s: float = 20.0) -> Node:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen([find_redis_server(), *self.args],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT, cwd=self.directory)
        client = self.admin()
        process = self.process

        def answers() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"{self.name} exited with {process.returncode}: "
                                     f"{self.log_tail()}")
            # The port may be another server's (it was free when we looked): check it is
            # ours.
            return _quietly(lambda: client.info("server").get("process_id") == process.pid)()

        try:
            wait_until(answers, timeout=timeout_s,
                       what=lambda: f"{self.name} did not answer: {self.log_tail()}")
        except AssertionError:
            self.stop()
            raise
        return self

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: no shutdown, nothing more written or replicated."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def server_args(directory: Path, name: str, port: int, *extra: str) -> list[str]:
    """A loopback ``redis-server`` without persistence (the tests kill, never restart)."""
    return ["--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory),
            "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--logfile", str(directory / f"{name}.log"), *extra]


# -- TLS -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    """A CA, and a server certificate it signed for 127.0.0.1 and localhost."""

    ca: Path
    cert: Path
    key: Path
    other_ca: Path
    """A second CA that signed nothing here: checking by it must fail."""


def make_certs(directory: Path) -> Certs:
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-subj", f"/CN=gpu-tasks test {ca}")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
            "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", "server.pem", "-extfile", "san.ext")
    return Certs(directory / "ca.pem", directory / "server.pem", directory / "server.key",
                 directory / "other-ca.pem")


# -- Sentinel --------------------------------------------------------------------------


@dataclass
class SentinelSet:
    """A master, one replica, three Sentinels (quorum 2) that fail the master over one
    second after it stops answering."""

    directory: Path
    master_name: str = "gpu-tasks-test"
    password: str = ""
    """Of the Redis servers (requirepass, masterauth; the Sentinels' auth-pass)."""
    sentinel_password: str = ""
    """Of the Sentinels themselves (requirepass in sentinel.conf)."""
    down_after_ms: int = 1000
    data: list[Node] = field(default_factory=list)
    sentinels: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        """``GPU_TASKS_REDIS_URL``: every Sentinel, the master's name and the passwords."""
        login = f":{self.password}@" if self.password else ""
        addresses = ";".join(f"sentinel://{login if i == 0 else ''}127.0.0.1:{s.port}/0"
                             for i, s in enumerate(self.sentinels))
        query = f"?master_name={self.master_name}"
        if self.sentinel_password:
            query += f"&sentinel_password={self.sentinel_password}"
        return addresses + query

    def start(self) -> SentinelSet:
        auth = ["--requirepass", self.password, "--masterauth", self.password] \
            if self.password else []
        master_port, replica_port = free_port(), free_port()
        self.data = [
            Node("master", self.directory, server_args(self.directory, "master", master_port,
                                                       *auth),
                 self._client(master_port, self.password), master_port).start(),
            Node("replica", self.directory,
                 server_args(self.directory, "replica", replica_port, *auth,
                             "--replicaof", "127.0.0.1", str(master_port)),
                 self._client(replica_port, self.password), replica_port).start(),
        ]
        replica = self.data[1].admin()
        wait_until(_quietly(lambda: replica.info("replication").get("master_link_status")
                            == "up"), what="the replica never synced")
        for i in range(3):
            port = free_port()
            conf = self.directory / f"sentinel-{i}.conf"  # Sentinel rewrites it: our own
            lines = [f"port {port}", "bind 127.0.0.1", "daemonize no",
                     f"dir {self.directory}", f"logfile {self.directory / f'sentinel-{i}.log'}",
                     f"sentinel monitor {self.master_name} 127.0.0.1 {master_port} 2",
                     f"sentinel down-after-milliseconds {self.master_name} "
                     f"{self.down_after_ms}",
                     f"sentinel failover-timeout {self.master_name} 5000",
                     f"sentinel parallel-syncs {self.master_name} 1"]
            if self.password:
                lines.append(f"sentinel auth-pass {self.master_name} {self.password}")
            if self.sentinel_password:
                lines.append(f"requirepass {self.sentinel_password}")
            conf.write_text("\n".join(lines) + "\n")
            self.sentinels.append(Node(f"sentinel-{i}", self.directory,
                                       [str(conf), "--sentinel"],
                                       self._client(port, self.sentinel_password), port
                                       ).start())
        # Ready when every Sentinel knows the replica and the two other Sentinels (they
        # find each other through the master's hello channel, every 2 s).
        for node in self.sentinels:
            client = node.admin()
            knows_all = _quietly(lambda c=client: _knows_all(c, self.master_name))  # type: ignore[misc]
            wait_until(knows_all, what=f"{node.name} never saw the replica and the other Sentinels")
        return self

    def _client(self, port: int, password: str) -> Callable[[], redis.Redis]:
        return lambda: redis.Redis(host="127.0.0.1", port=port, password=password or None,
                                   socket_timeout=2, socket_connect_timeout=2)

    @property
    def master(self) -> Node:
        """The node the Sentinels name as master now."""
        _host, port = self.master_address()
        return next(n for n in self.data if n.port == port)

    def master_address(self) -> tuple[str, int]:
        for node in self.sentinels:
            with contextlib.suppress(redis.RedisError):
                reply = node.admin().sentinel_get_master_addr_by_name(self.master_name)
                if reply:
                    host = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
                    return str(host), int(reply[1])
        raise AssertionError("no Sentinel answers")

    def stop(self) -> None:
        for node in [*self.sentinels, *self.data]:
            node.stop()

    def __enter__(self) -> SentinelSet:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *_: object) -> None:
        self.stop()


def _knows_all(client: redis.Redis, master_name: str) -> bool:
    state = client.sentinel_master(master_name)
    return int(state.get("num-slaves", 0)) >= 1 and int(state.get("num-other-sentinels", 0)) >= 2


def _quietly(condition: Callable[[], bool]) -> Callable[[], bool]:
    """``condition``, false while Redis does not answer."""
    def check() -> bool:
        try:
            return condition()
        except redis.RedisError:
            return False
    return check
