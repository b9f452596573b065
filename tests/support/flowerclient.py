"""Talking to a real Flower over HTTP, with or without its basic-auth credentials, and
starting one of our own with ``gpu-tasks flower``, as an operator would."""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpu_tasks.local.cluster import LocalCluster, Process, gpu_tasks_command, spawn
from tests.conftest import wait_until
from tests.support.ports import free_port


@dataclass
class Reply:
    status: int
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class FlowerClient:
    url: str
    basic_auth: str | None = None
    """``user:password``, sent as an Authorization header; None sends none."""

    def request(self, path: str, method: str = "GET", body: Any = None,
                basic_auth: str | None = "", timeout: float = 30) -> Reply:
        """``basic_auth=""`` (the default) uses this client's credentials."""
        creds = self.basic_auth if basic_auth == "" else basic_auth
        headers = {"Content-Type": "application/json"}
        if creds is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(creds.encode()).decode()
        data = None if body is None else json.dumps(body).encode()
        if method == "POST" and data is None:
            data = b""
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return Reply(resp.status, resp.read().decode())
        except urllib.error.HTTPError as exc:
            return Reply(exc.code, exc.read().decode())

    def get(self, path: str, **kwargs: Any) -> Reply:
        return self.request(path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Reply:
        return self.request(path, "POST", body, **kwargs)

    def workers(self, names: list[str]) -> dict[str, Any]:
        """``/api/workers?refresh=1`` once it lists every one of ``names`` with its stats
        (Flower's first inspection after it starts can miss replies)."""

        def listed() -> dict[str, Any] | None:
            reply = self.get("/api/workers?refresh=1")
            if reply.status != 200:
                return None
            found = reply.json()
            ok = all("stats" in (found.get(n) or {}) for n in names)
            return found if ok else None

        return wait_until(listed, timeout=30, interval=0.5,
                          what=lambda: self.get("/api/workers").body[:500])


def client_of(cluster: LocalCluster) -> FlowerClient:
    """The session cluster's Flower, with the credentials the cluster gave it."""
    assert cluster.flower_url is not None and cluster.flower_auth is not None
    return FlowerClient(cluster.flower_url, cluster.flower_auth.basic_auth)


@contextmanager
def own_flower(env: dict[str, str], log_dir: Path, *args: str,
               port: int | None = None) -> Iterator[tuple[str, Process]]:
    """``gpu-tasks flower ARGS`` on a free loopback port with ``env``; yields its URL and
    process once /healthcheck answers, and stops it (SIGTERM: Flower saves its state)."""
    port = port or free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    proc = spawn(f"flower-{port}", gpu_tasks_command("flower", f"--port={port}", *args),
                 env, log_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        def answers() -> bool:
            assert proc.alive(), proc.log_tail()
            return FlowerClient(url).get("/healthcheck", timeout=1).status == 200

        wait_until(lambda: _quietly(answers), timeout=60, interval=0.2,
                   what=proc.log_tail)
        yield url, proc
    finally:
        stop(proc)


def stop(proc: Process) -> None:
    if proc.alive():
        proc.popen.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(20)
    proc.signal_group(signal.SIGKILL)  # whatever is left of its group
    proc.popen.wait()
    proc.log_file.close()


def _quietly(check: Any) -> bool:
    try:
        return bool(check())
    except OSError:
        return False


def every_flower_page(cluster: LocalCluster) -> list[str]:
    """Start Flower for ``cluster`` (started without) and read its pages and API with its
    login, and the worker configuration its Config tab shows: for tests that look for
    what must not be there (a password)."""
    cluster.start_flower()
    wait_until(cluster._flower_answers, timeout=60, interval=0.2,
               what=lambda: cluster.flower.log_tail() if cluster.flower else "")
    flower = client_of(cluster)
    workers = flower.workers([f"gpu{i}@{cluster.settings.node}" for i in range(cluster.gpus)])
    pages = [json.dumps(workers)]
    for path in ["/", "/workers", "/tasks", "/broker", "/api/queues/length",
                 f"/worker/gpu0@{cluster.settings.node}", "/api/tasks",
                 f"/api/workers?workername=gpu0@{cluster.settings.node}&refresh=1"]:
        reply = flower.get(path)
        assert reply.status == 200, (path, reply.status, reply.body[:500])
        pages.append(reply.body)
    # The worker's configuration (Flower's "Config" tab: Celery's inspect conf) names the
    # broker and the backend with their passwords masked
    from gpu_tasks.app import app

    conf = app.control.inspect(destination=[f"gpu0@{cluster.settings.node}"],
                               timeout=5).conf() or {}
    assert conf, "the worker did not answer inspect conf"
    pages.append(json.dumps(conf, default=str))
    return pages
