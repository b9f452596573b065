"""`gpu-tasks up --once`: the whole job on an embedded Redis, as a smoke test."""

from __future__ import annotations

import os
import re
import shelve
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import redis

from tests.conftest import DEFAULT_PORT, REPO, gpu_tasks_cli, wait_until


def test_up_once_runs_the_demo_and_leaves_nothing_running(tmp_path: Path) -> None:
    # Given no Redis configured: `up` must start its own
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_TASKS_")}
    env["GPU_TASKS_DATA_DIR"] = str(tmp_path / "state")
    env["GPU_TASKS_NODE"] = "smoke"
    # When
    done = gpu_tasks_cli("up", "--once", "--gpus", "3", "--entities", "30", env=env,
                         timeout=240)
    # Then the demo passed on three sim GPUs, with Flower up
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "180 requests, 30 entities, 3 GPUs: every entity stayed on one GPU" in out
    # With a password of its own, in a file only this user reads; named, never printed
    creds = (tmp_path / "state" / "flower-credentials").resolve()
    assert re.search(r"Flower:\s+http://127\.0\.0\.1:\d+ \(user gpu-tasks; password in "
                     + re.escape(str(creds)) + r"\)", out)
    assert creds.stat().st_mode & 0o777 == 0o600
    password = creds.read_text().strip().split(":", 1)[1]
    assert len(password) >= 16 and password not in out + done.stderr
    assert not any(password in log.read_text(errors="replace")
                   for log in (tmp_path / "state" / "logs").glob("*.log"))
    # And Flower saw the demo's requests (workers send task events from the first one)
    # and kept them in its history on disk
    with shelve.open(str(tmp_path / "state" / "flower.db"), flag="r") as history:
        shown = {t.name for t in history["events"].tasks.values()}
    assert "gpu_tasks.alloc" in shown
    assert "\x1b[" not in out and "sending" not in out  # piped: no colours, no progress bar
    redis_port = int(re.search(r"Redis:\s+redis://:\*\*\*@127\.0\.0\.1:(\d+)/0", out).group(1))
    assert redis_port != DEFAULT_PORT  # its own server, not the system one
    assert (tmp_path / "state" / "redis" / "appendonlydir").exists() or any(
        (tmp_path / "state" / "redis").glob("*.aof"))
    # And nothing it started is still running
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", redis_port)) != 0, "redis-server still running"
    assert started_by(tmp_path) == []


def started_by(tmp_path: Path) -> list[str]:
    """Processes whose command line or environment names the run's data directory."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            env = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if str(tmp_path) in " ".join(proc.info["cmdline"] or []) or str(tmp_path) in env.get(
                "GPU_TASKS_DATA_DIR", ""):
            found.append(" ".join(proc.info["cmdline"] or []))
    return found


def test_up_refuses_an_unknown_backend() -> None:
    done = gpu_tasks_cli("up", "--once", "--backend", "opencl")
    assert done.returncode == 2 and "opencl" in done.stderr


def test_up_stays_up_until_sigterm_then_stops_everything(tmp_path: Path) -> None:
    # Given `gpu-tasks up` (not --once) on an embedded Redis
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_TASKS_")}
    env.update(GPU_TASKS_DATA_DIR=str(tmp_path / "state"), GPU_TASKS_NODE="staysup",
               PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "gpu_tasks.cli", "up", "--gpus", "2",
                             "--entities", "5", "--no-flower"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("up: Ctrl-C"):
                break
        else:
            raise AssertionError("".join(lines))
        # While it is up, its processes are running: redis-server and two workers, at least
        wait_until(lambda: len(started_by(tmp_path)) >= 3, timeout=30,
                   what=lambda: str(started_by(tmp_path)))
        assert proc.poll() is None
        # And its Redis takes no client without the password, which is in a file only this
        # user reads (its data directory too), named and never printed
        state = tmp_path / "state"
        url_file = state / "redis-url"
        assert f"its URL with the password, for your other shells: {url_file}" in "".join(lines)
        assert state.stat().st_mode & 0o777 == 0o700
        assert url_file.stat().st_mode & 0o777 == 0o600
        assert (state / "redis-password").stat().st_mode & 0o777 == 0o600
        url = url_file.read_text().strip()
        password = (state / "redis-password").read_text().strip()
        assert len(password) >= 16 and f":{password}@" in url
        assert password not in "".join(lines)
        port = int(re.search(r"127\.0\.0\.1:(\d+)/", url).group(1))  # type: ignore[union-attr]
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        assert redis.Redis.from_url(url).ping()
        # When it gets SIGTERM
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    # Then it stops cleanly, and so does everything it started
    assert proc.returncode == 0, rest
    assert "stopped" in rest
    assert started_by(tmp_path) == []


def test_up_with_fewer_gpus_than_the_last_run_serves_every_shard(tmp_path: Path) -> None:
    # Given a first run with 3 GPUs on a data directory (its shard map names 3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_TASKS_")}
    env.update(GPU_TASKS_DATA_DIR=str(tmp_path / "state"), GPU_TASKS_NODE="shrinks")
    first = gpu_tasks_cli("up", "--once", "--gpus", "3", "--entities", "10", "--no-flower",
                          env=env, timeout=180)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    # When the next run on it starts 2 (the README's `make run ARGS="--gpus 2"`)
    second = gpu_tasks_cli("up", "--once", "--gpus", "2", "--entities", "10", "--no-flower",
                           env=env, timeout=180)
    # Then the third GPU's shards go to the two it starts, it says so, and the demo passes
    # (before, its requests waited for a consumer that never came)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert re.search(r"up: the shard map gave \d+ shards to gpu\.shrinks\.2, which this run "
                     "does not start", second.stdout)
    assert "60 requests, 10 entities, 2 GPUs: every entity stayed on one GPU" in second.stdout
