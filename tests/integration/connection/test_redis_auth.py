"""A deployment on a Redis that wants a password, an ACL user, or TLS.

Each mode has a redis-server of its own (never 6379): ``requirepass``; the shipped ACL
file ``ops/redis-users.acl`` (user ``gpu-tasks``, least privilege, and no default user);
TLS only, with certificates made here by ``openssl``. A small cluster serves requests sent
with ``apply_async``, ``gpu-tasks submit`` and ``gpu-tasks batch``; ``status``, the
exporter and Flower (through HTTP, with its login) read it. The password must appear in
none of it: CLI output, worker and Flower logs, Flower's pages, the results in Redis.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from gpu_tasks.app import configure
from gpu_tasks.control.shardmap import ShardMap, ShardMapStore
from gpu_tasks.errors import BrokerUnavailable, NoSuchBuffer
from gpu_tasks.local.cluster import LocalCluster
from gpu_tasks.protocol.routing import shard_index, shard_name
from gpu_tasks.redisurl import redacted_url
from gpu_tasks.settings import Settings
from gpu_tasks.tasks import alloc, read, write
from tests.conftest import (
    REPO,
    entity_owned_by,
    gpu_tasks_cli,
    kill_worker,
    own_cluster,
    wait_until,
)
from tests.support.exporter import exporter
from tests.support.flowerclient import every_flower_page
from tests.support.ports import free_port
from tests.support.redisnodes import Certs, Node, make_certs, server_args

PASSWORD = f"pw-{secrets.token_hex(12)}"
"""gpu-tasks' password in every mode; it must never show anywhere."""
ADMIN_PASSWORD = f"admin-{secrets.token_hex(12)}"
ACL_FILE = REPO / "ops" / "redis-users.acl"
TIMEOUT = 60


@dataclass
class Deployment:
    mode: str
    url: str
    """``GPU_TASKS_REDIS_URL``, with gpu-tasks' password."""
    node: Node
    certs: Certs | None = None

    def admin(self) -> redis.Redis:
        return self.node.admin()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def acl_file(directory: Path) -> Path:
    """The shipped ACL file with this test's password hashes filled in."""
    text = ACL_FILE.read_text()
    for placeholder, password in (("<sha256-of-the-gpu-tasks-password>", PASSWORD),
                                  ("<sha256-of-the-admin-password>", ADMIN_PASSWORD)):
        assert placeholder in text
        text = text.replace(placeholder, hashlib.sha256(password.encode()).hexdigest())
    path = directory / "users.acl"
    path.write_text(text)
    return path


def start(mode: str, directory: Path, certs: Certs) -> Deployment:
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    if mode == "password":
        args = server_args(directory, mode, port, "--requirepass", PASSWORD)
        url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"

        def admin() -> redis.Redis:
            return redis.Redis(port=port, password=PASSWORD)
    elif mode == "acl":
        args = server_args(directory, mode, port, "--aclfile", str(acl_file(directory)))
        url = f"redis://gpu-tasks:{PASSWORD}@127.0.0.1:{port}/0"

        def admin() -> redis.Redis:
            return redis.Redis(port=port, username="admin", password=ADMIN_PASSWORD)
    else:
        args = server_args(directory, mode, 0, "--tls-port", str(port),
                           "--tls-cert-file", str(certs.cert),
                           "--tls-key-file", str(certs.key),
                           "--tls-ca-cert-file", str(certs.ca),
                           "--tls-auth-clients", "no", "--requirepass", PASSWORD)
        url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={certs.ca}"

        def admin() -> redis.Redis:
            return redis.Redis(port=port, password=PASSWORD, ssl=True,
                               ssl_ca_certs=str(certs.ca))
    node = Node(mode, directory, args, admin, port).start()
    return Deployment(mode, url, node, certs if mode == "tls" else None)


@pytest.fixture(params=["password", "acl", "tls"])
def deployment(request: pytest.FixtureRequest, tmp_path: Path,
               certs: Certs) -> Iterator[Deployment]:
    running = start(request.param, tmp_path / "redis", certs)
    try:
        yield running
    finally:
        if running.mode == "acl":  # shown where the test fails: what the ACL refused
            with contextlib.suppress(redis.RedisError):
                for entry in running.admin().acl_log(count=50):
                    print("ACL LOG:", {k: entry.get(k) for k in (
                        "reason", "context", "object", "username", "count")})
        running.node.stop()


@pytest.mark.slow  # a cluster on each of three Redis logins
def test_a_deployment_serves_and_never_shows_the_password(
        deployment: Deployment, tmp_path: Path, settings: Settings) -> None:
    outputs: list[str] = []
    with own_cluster(settings, deployment.url, tmp_path, gpus=2) as cluster:
        env = cluster.settings.child_env()
        # apply_async: results, typed errors
        entity = "auth-user-1"
        alloc.apply_async(kwargs={"entity_id": entity, "name": "v", "shape": [3]}
                          ).get(timeout=TIMEOUT)
        write.apply_async(kwargs={"entity_id": entity, "name": "v",
                                  "values": [1, 2, 3]}).get(timeout=TIMEOUT)
        got = read.apply_async(kwargs={"entity_id": entity, "name": "v", "as_list": True}
                               ).get(timeout=TIMEOUT)
        assert got["values"] == [1.0, 2.0, 3.0]
        with pytest.raises(NoSuchBuffer):
            read.apply_async(kwargs={"entity_id": entity, "name": "nope"}).get(timeout=TIMEOUT)
        # gpu-tasks submit, and batch
        done = gpu_tasks_cli("submit", "alloc", "--entity", "auth-user-2", "--kwargs",
                             '{"name": "w", "shape": [2]}', "--wait", "--json", env=env)
        outputs += [done.stdout, done.stderr]
        assert done.returncode == 0, done.stdout + done.stderr
        assert json.loads(done.stdout)["result"]["buffer"]["name"] == "w"
        lines = tmp_path / "batch.jsonl"
        lines.write_text("".join(json.dumps({"entity_id": f"auth-batch-{i}", "task": "alloc",
                                             "kwargs": {"name": "b", "shape": [1]}}) + "\n"
                                 for i in range(20)))
        done = gpu_tasks_cli("batch", str(lines), "--wait", "--timeout", "60", "--json",
                             env=env)
        outputs += [done.stdout, done.stderr]
        assert done.returncode == 0, done.stdout + done.stderr
        summary = json.loads(done.stdout)
        assert summary["sent"] == 20 and summary["succeeded"] == 20
        # gpu-tasks status
        done = gpu_tasks_cli("status", "--json", env=env)
        outputs += [done.stdout, done.stderr]
        assert done.returncode == 0, done.stderr
        gpus = json.loads(done.stdout)["gpus"]
        assert sorted(g["gpu"] for g in gpus if g["consuming"]) == sorted(cluster.queues)
        done = gpu_tasks_cli("status", env=env)  # the table names the Redis
        outputs += [done.stdout, done.stderr]
        # A live handoff moves the entity's shard with its state
        outputs += move_and_restart(cluster, entity, deployment.admin())
        # The exporter
        with exporter(cluster.settings) as metrics_url:
            import urllib.request

            with urllib.request.urlopen(metrics_url, timeout=10) as resp:
                metrics = resp.read().decode()
        outputs.append(metrics)
        assert "gpu_tasks_gpu_consuming" in metrics
        # Flower: its pages and its API, through HTTP with its login
        outputs += every_flower_page(cluster)
        results = stored_results(deployment.admin())
        assert len(results) >= 25  # 4 apply_async, 1 submit, 20 batch lines
        outputs += results
        if deployment.mode == "acl":
            # Nothing the deployment did was refused by the ACL
            denied = deployment.admin().acl_log()
            assert not denied, json.dumps(denied, default=str, indent=1)[:3000]
    logs = [p.read_text(errors="replace") for p in cluster.log_dir.glob("*.log")]
    assert len(logs) >= 3  # two workers and Flower
    leaked = [o[:200] for o in [*outputs, *logs] if PASSWORD in o]
    assert not leaked
    # TLS was checked everywhere (kombu warns where it would not check)
    assert not [log for log in logs if "insecure SSL" in log]


def move_and_restart(cluster: LocalCluster, entity: str, admin: redis.Redis) -> list[str]:
    """What else a deployment does with Redis: a live handoff (``shards move``), a poison
    message dead-lettered and listed (``dlq``), a killed worker restarted (it takes its
    lease over and puts back what it had taken). Returns the CLI's output."""
    env = cluster.settings.child_env()
    index = shard_index(entity, 1024)
    owner = ShardMapStore(admin).load().shards[index].owner
    target = next(q for q in cluster.queues if q != owner)
    done = gpu_tasks_cli("shards", "move", shard_name(index), target, "--json", env=env)
    outputs = [done.stdout, done.stderr]
    assert done.returncode == 0, done.stdout + done.stderr
    got = read.apply_async(kwargs={"entity_id": entity, "name": "v", "as_list": True}
                           ).get(timeout=TIMEOUT)
    assert got["values"] == [1.0, 2.0, 3.0] and got["gpu"] == target
    admin.lpush(cluster.queues[0], b"{not a message")

    def dead_letters() -> list[object]:
        listed = gpu_tasks_cli("dlq", "list", "--json", env=env)
        outputs.extend([listed.stdout, listed.stderr])
        assert listed.returncode == 0, listed.stderr
        return list(json.loads(listed.stdout))

    wait_until(dead_letters, timeout=TIMEOUT, interval=0.5)
    done = gpu_tasks_cli("dlq", "purge", "--yes", env=env)
    outputs += [done.stdout, done.stderr]
    assert done.returncode == 0, done.stderr
    kill_worker(cluster, 0)
    cluster.workers[0] = cluster.start_worker(0)
    cluster.wait_ready(TIMEOUT)
    other = entity_owned_by(admin, cluster.queues[0], "after-restart")
    assert alloc.apply_async(kwargs={"entity_id": other, "name": "r", "shape": [1]}
                             ).get(timeout=TIMEOUT)["gpu"] == cluster.queues[0]
    return outputs


def test_up_on_a_redis_with_a_password_never_shows_it(tmp_path: Path, certs: Certs) -> None:
    # Given `gpu-tasks up` on an existing Redis that wants a password
    running = start("password", tmp_path / "redis", certs)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_TASKS_")}
        env.update(GPU_TASKS_REDIS_URL=running.url, GPU_TASKS_NODE="upauth",
                   GPU_TASKS_DATA_DIR=str(tmp_path / "state"))
        done = gpu_tasks_cli("up", "--once", "--gpus", "1", "--entities", "5", env=env,
                             timeout=240)
    finally:
        running.node.stop()
    # Then the demo passes, and neither its output nor a log (Flower's too) has the password
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert redacted_url(running.url) in done.stdout
    logs = [p.read_text(errors="replace") for p in (tmp_path / "state").rglob("*.log")]
    assert len(logs) >= 2  # the worker's and Flower's
    assert not [o for o in [done.stdout, done.stderr, *logs] if PASSWORD in o]


@pytest.mark.parametrize("command", [
    ("FLUSHALL",), ("FLUSHDB",), ("KEYS", "*"), ("CONFIG", "GET", "requirepass"),
    ("DEBUG", "SLEEP", "0"), ("SHUTDOWN", "NOSAVE"), ("ACL", "LIST"), ("MONITOR",),
    ("CLIENT", "LIST"), ("INFO",), ("SCRIPT", "FLUSH"), ("FUNCTION", "FLUSH"),
    ("REPLICAOF", "127.0.0.1", "1"), ("SET", "someone-elses-key", "1"),
    ("GET", "session:42"), ("PUBLISH", "someone-elses-channel", "x"),
])
def test_the_acl_user_cannot_do_what_gpu_tasks_never_does(
        command: tuple[str, ...], acl_deployment: Deployment) -> None:
    user = redis.Redis.from_url(acl_deployment.url)
    # (DEBUG is refused by the server's own configuration before the ACL is asked)
    with pytest.raises(redis.ResponseError, match=r"no permissions|DEBUG command not allowed"):
        user.execute_command(*command)
    assert user.set("gpu-tasks:probe", "1")  # while its own keys are its own


@pytest.fixture(scope="module")
def acl_deployment(tmp_path_factory: pytest.TempPathFactory,
                   certs: Certs) -> Iterator[Deployment]:
    running = start("acl", tmp_path_factory.mktemp("acl"), certs)
    try:
        yield running
    finally:
        running.node.stop()


def stored_results(admin: redis.Redis) -> list[str]:
    keys = list(admin.scan_iter("celery-task-meta-*"))
    return [v.decode(errors="replace") for v in admin.mget(keys) if v]


# -- a wrong password, or a certificate that cannot be checked -----------------------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[Deployment]:
    """A password-protected Redis with a shard map, for the refusals below."""
    running = start("password", tmp_path_factory.mktemp("guarded"), certs)
    ShardMapStore(running.admin()).create(ShardMap.balanced(["gpu.authnode.0"], 16))
    try:
        yield running
    finally:
        running.node.stop()


WRONG = "wrong-" + secrets.token_hex(8)


def wrong_url(deployment: Deployment) -> str:
    return deployment.url.replace(PASSWORD, WRONG)


def cli_env(settings: Settings, url: str, tmp_path: Path) -> dict[str, str]:
    own = settings.replace(redis_url=url, node="authnode", data_dir=str(tmp_path / "gt"),
                           flower_basic_auth="ops:flower-" + secrets.token_hex(4))
    return own.child_env()


def one_line_error(output: str, url: str) -> None:
    shown = redacted_url(url)
    assert "Traceback" not in output, output
    assert WRONG not in output and PASSWORD not in output
    assert shown in output, (shown, output)


@pytest.mark.parametrize("command", [
    ["worker", "--gpu", "0", "--backend", "sim"],
    ["submit", "alloc", "--entity", "e", "--kwargs", '{"name": "x", "shape": [1]}'],
    ["status"],
    ["flower", "--port", "{port}"],
    ["exporter", "--port", "{port}"],
])
def test_a_wrong_password_ends_a_command_at_once_saying_where(
        command: list[str], guarded: Deployment, settings: Settings, tmp_path: Path) -> None:
    url = wrong_url(guarded)
    started = time.monotonic()
    port = str(free_port())
    done = gpu_tasks_cli(*(a.replace("{port}", port) for a in command),
                         env=cli_env(settings, url, tmp_path), timeout=60)
    took = time.monotonic() - started
    assert done.returncode not in (0, None), done.stdout + done.stderr
    assert took < 30, took
    assert "refused the login" in done.stderr, done.stderr
    one_line_error(done.stdout + done.stderr, url)
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_worker_whose_login_is_refused_while_it_runs_exits_non_zero(
        tmp_path: Path, settings: Settings, certs: Certs) -> None:
    # Given a worker serving a password-protected Redis
    running = start("password", tmp_path / "redis", certs)
    try:
        ShardMapStore(running.admin()).create(ShardMap.balanced(["gpu.authnode.0"], 16))
        own = settings.replace(redis_url=running.url, node="authnode",
                               data_dir=str(tmp_path / "gt"))
        cluster = LocalCluster(own, gpus=1, flower=False)
        with cluster:
            worker = cluster.workers[0]
            # When the password changes under it (rotated; its connections dropped)
            admin = running.admin()
            admin.config_set("requirepass", "rotated-" + secrets.token_hex(4))
            admin.client_kill_filter(_type="normal", skipme=True)
            # Then it exits non-zero at once (Celery would retry the login for an hour),
            # saying why without the password
            wait_until(lambda: not worker.alive(), timeout=30, what=worker.log_tail)
            assert worker.popen.returncode != 0
            log = worker.log_path.read_text(errors="replace")
            assert "refused the GPU worker's login" in log and PASSWORD not in log
            assert redacted_url(running.url) in log
    finally:
        running.node.stop()


def test_a_batch_with_a_wrong_password_exits_2_saying_where(
        guarded: Deployment, settings: Settings, tmp_path: Path) -> None:
    url = wrong_url(guarded)
    lines = tmp_path / "b.jsonl"
    lines.write_text(json.dumps({"entity_id": "e", "task": "alloc",
                                 "kwargs": {"name": "x", "shape": [1]}}) + "\n")
    done = gpu_tasks_cli("batch", str(lines), env=cli_env(settings, url, tmp_path))
    assert done.returncode == 2, done.stdout + done.stderr
    one_line_error(done.stdout + done.stderr, url)


def test_apply_async_with_a_wrong_password_raises_broker_unavailable_without_it(
        guarded: Deployment, settings: Settings) -> None:
    url = wrong_url(guarded)
    configure(settings.replace(redis_url=url, redis_timeout_s=2.0))
    try:
        with pytest.raises(BrokerUnavailable) as raised:
            alloc.apply_async(kwargs={"entity_id": "e", "name": "x", "shape": [1]})
    finally:
        configure(settings)
    text = f"{raised.value} {raised.value!r} {raised.value.args}"
    assert WRONG not in text and PASSWORD not in text
    assert "refused the login" in text and "nothing was enqueued" in text


@pytest.mark.parametrize("query, why", [
    ("", "CERTIFICATE_VERIFY_FAILED"),  # the default: the system's CAs, which lack ours
    ("?ssl_ca_certs={other_ca}", "CERTIFICATE_VERIFY_FAILED"),
])
def test_tls_checks_the_server_certificate_by_default(
        query: str, why: str, tmp_path: Path, settings: Settings, certs: Certs) -> None:
    running = start("tls", tmp_path / "redis", certs)
    try:
        url = running.url.split("?")[0] + query.format(other_ca=certs.other_ca)
        done = gpu_tasks_cli("worker", "--gpu", "0", "--backend", "sim",
                             env=cli_env(settings, url, tmp_path), timeout=60)
        assert done.returncode == 1, done.stdout + done.stderr
        assert why in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and PASSWORD not in done.stdout + done.stderr
        # Told not to check (ssl_cert_reqs=none), it connects, over TLS all the same
        loose = Settings(redis_url=running.url.split("?")[0] + "?ssl_cert_reqs=none")
        assert loose.redis_client().ping()
    finally:
        running.node.stop()
