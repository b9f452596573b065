"""Ownership made real: each misuse of ordinary Celery and Flower tools ends with the
request run exactly once by its shard's owner, or refused; workers follow the shard
map, hold their GPU's lease, and put back what a crash left behind.

Executions are counted, not results: ``tests.record`` appends ``<entity>:<seq>`` to a
Redis list every time it runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import psutil
import pytest
import redis
from celery.result import AsyncResult

from gpu_tasks.app import app
from gpu_tasks.control.lease import LeaseStore
from gpu_tasks.control.shardmap import ShardMap, ShardMapStore
from gpu_tasks.errors import EntityStateLost
from gpu_tasks.local.cluster import LocalCluster
from gpu_tasks.protocol.routing import shard_index, shard_name
from gpu_tasks.settings import Settings
from gpu_tasks.tasks import alloc, read, stats
from tests import usertasks
from tests.conftest import (
    NODE,
    REPO,
    entity_owned_by,
    gpu_tasks_cli,
    own_cluster,
    wait_until,
)
from tests.support.messages import raw_task_message

TIMEOUT = 60
GPU0, GPU1, GPU2 = (f"gpu.{NODE}.{i}" for i in range(3))


def new_log() -> str:
    return f"executions:{uuid.uuid4().hex[:8]}"


def executions(client: redis.Redis, log: str) -> Counter[str]:
    return Counter(x.decode() for x in client.lrange(log, 0, -1))


def record(entity: str, log: str, seq: int = 0, seconds: float = 0.0) -> AsyncResult:
    return usertasks.record.apply_async(
        kwargs={"entity_id": entity, "log": log, "seq": seq, "seconds": seconds})


# -- misuse of ordinary tools, against the session cluster (no map change) -----------------


def test_requests_pushed_onto_the_wrong_queue_run_once_on_their_owner(
        cluster: LocalCluster, client: redis.Redis) -> None:
    # Given an entity owned by GPU 0, and raw requests for it (a producer in another
    # language) pushed onto GPU 2's queue, GPU 1's queue and a shard queue not its own
    entity = entity_owned_by(client, GPU0, "foreign")
    own_shard = shard_index(entity, 1024)
    wrong_shard = shard_name((own_shard + 1) % 1024)
    log = new_log()
    sent = []
    for seq, queue in enumerate([GPU2, GPU1, wrong_shard]):
        task_id, payload = raw_task_message(
            "tests.record", {"entity_id": entity, "log": log, "seq": seq}, queue)
        client.lpush(queue, payload)
        sent.append(task_id)
    # Then each ran exactly once, on GPU 0, taken from the entity's own shard queue
    for task_id in sent:
        result = AsyncResult(task_id, app=app).get(timeout=TIMEOUT)
        assert (result["gpu"], result["queue"]) == (GPU0, shard_name(own_shard))
    assert executions(client, log) == {f"{entity}:{seq}": 1 for seq in range(3)}


def test_a_request_that_cannot_be_routed_is_answered_with_the_reason(
        cluster: LocalCluster, client: redis.Redis) -> None:
    from gpu_tasks.errors import RoutingError

    log = new_log()
    cases = [("shard-3", {"log": log}, "without entity_id arrived on shard queue shard-3"),
             (GPU1, {"entity_id": "", "log": log}, "non-empty string, got ''"),
             (GPU1, {"entity_id": 42, "log": log}, "got int 42")]
    for queue, kwargs, message in cases:
        task_id, payload = raw_task_message("tests.record", kwargs, queue)
        client.lpush(queue, payload)
        with pytest.raises(RoutingError, match=message):
            AsyncResult(task_id, app=app).get(timeout=TIMEOUT)
    assert executions(client, log) == {}


def test_remote_control_that_would_break_a_gpu_worker_is_refused(
        cluster: LocalCluster) -> None:
    worker = f"gpu1@{NODE}"
    before = app.control.inspect(destination=[worker], timeout=5).active_queues()[worker]
    attempts = {
        "add_consumer": lambda: app.control.add_consumer(
            "shard-5", destination=[worker], reply=True, timeout=5),
        "cancel_consumer": lambda: app.control.cancel_consumer(
            shard_name(1), destination=[worker], reply=True, timeout=5),
        "pool_grow": lambda: app.control.pool_grow(1, destination=[worker], reply=True,
                                                   timeout=5),
        "pool_shrink": lambda: app.control.pool_shrink(1, destination=[worker], reply=True,
                                                       timeout=5),
        "autoscale": lambda: app.control.autoscale(4, 1, destination=[worker], reply=True,
                                                   timeout=5),
        "pool_restart": lambda: app.control.pool_restart(destination=[worker], reply=True,
                                                         timeout=5),
        "revoke --terminate": lambda: app.control.revoke(
            "some-task", terminate=True, destination=[worker], reply=True, timeout=5),
    }
    for name, attempt in attempts.items():
        replies = attempt()
        assert replies, f"{name}: no reply"
        answer = replies[0][worker]
        assert "error" in answer and f"refused by GPU worker {worker}" in answer["error"], (
            name, answer)
    # And nothing changed: one pool child, the same queues
    stats_now = app.control.inspect(destination=[worker], timeout=5).stats()[worker]
    assert len(stats_now["pool"]["processes"]) == 1
    after = app.control.inspect(destination=[worker], timeout=5).active_queues()[worker]
    assert sorted(q["name"] for q in after) == sorted(q["name"] for q in before)
    assert len(after) == 1024 // 4 + 1  # its shards and its own GPU queue
    # And what is harmless still works
    harmless = app.control.revoke("some-task", destination=[worker], reply=True, timeout=5)
    assert "flagged as revoked" in harmless[0][worker]["ok"]


def test_a_plain_celery_worker_refuses_to_start_and_takes_nothing(
        spare_url: str, settings: Settings) -> None:
    # Given a request waiting on a shard queue (no GPU worker in this database)
    client = redis.Redis.from_url(spare_url)
    ShardMapStore(client).create(ShardMap.balanced([GPU0], 16))
    _, payload = raw_task_message("gpu_tasks.alloc", {"entity_id": "user-42", "name": "x",
                                                      "shape": [1]}, "shard-1")
    client.lpush("shard-1", payload)
    # When someone starts a plain Celery worker of the app on that queue
    env = {**os.environ, **settings.replace(redis_url=spare_url).to_env()}
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "gpu_tasks.app", "worker",
                           "-Q", "shard-1", "-P", "solo"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    # Then it refuses, says what to run instead, and the request is still there
    assert done.returncode != 0
    assert "runs only in GPU workers" in done.stderr and "gpu-tasks worker --gpu" in done.stderr
    assert client.lrange("shard-1", 0, -1) == [payload.encode()]


def test_send_task_by_name_from_a_producer_that_never_imported_the_task(
        cluster: LocalCluster, client: redis.Redis, settings: Settings) -> None:
    log = new_log()
    entity = entity_owned_by(client, GPU2, "by-name")
    code = ("import sys\n"
            "from gpu_tasks.app import app\n"
            "r = app.send_task('tests.record', kwargs={'entity_id': sys.argv[1], "
            "'log': sys.argv[2], 'seq': 7})\n"
            "assert 'tests.usertasks' not in sys.modules\n"
            "print(r.id)\n")
    env = {**os.environ, **settings.to_env(), "GPU_TASKS_IMPORTS": ""}
    done = subprocess.run([sys.executable, "-c", code, entity, log], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=True)
    result = AsyncResult(done.stdout.strip(), app=app).get(timeout=TIMEOUT)
    assert result["gpu"] == GPU2
    assert executions(client, log) == {f"{entity}:7": 1}


def test_shards_init_force_refuses_while_workers_hold_leases(
        cluster: LocalCluster, client: redis.Redis, settings: Settings) -> None:
    epoch = ShardMapStore(client).epoch()
    env = {**os.environ, **settings.to_env()}
    done = gpu_tasks_cli("shards", "init", "--gpus", "2", "--force", env=env)
    assert done.returncode == 1
    assert "GPU workers hold leases" in done.stderr and "--discard-state" in done.stderr
    assert f"gpu0@{NODE}" in done.stderr
    changed_s = gpu_tasks_cli("shards", "init", "--gpus", "4", "--shards", "512", "--force",
                              "--discard-state", env=env)
    assert changed_s.returncode == 1 and "S would change from 1024 to 512" in changed_s.stderr
    assert ShardMapStore(client).epoch() == epoch


def test_shards_init_force_refuses_to_strand_queued_requests(spare_url: str) -> None:
    client = redis.Redis.from_url(spare_url)
    ShardMapStore(client).create(ShardMap.balanced([GPU0], 16))
    client.lpush("shard-12", "a request")
    env = {**os.environ, "GPU_TASKS_REDIS_URL": spare_url, "GPU_TASKS_NODE": NODE}
    done = gpu_tasks_cli("shards", "init", "--gpus", "1", "--shards", "8", "--force", env=env)
    assert done.returncode == 1
    assert "1 requests wait in 1 shard queues" in done.stderr and "shard-12" in done.stderr
    client.delete("shard-12")
    done = gpu_tasks_cli("shards", "init", "--gpus", "1", "--shards", "8", "--force", env=env)
    assert done.returncode == 0, done.stderr
    assert ShardMapStore(client).shard_count() == 8


# -- the map changes under running workers -------------------------------------------------


def consume_by(leases: LeaseStore, epoch: int, gpus: tuple[str, ...] = (GPU0, GPU1)) -> bool:
    """Whether every one of ``gpus`` has a worker consuming by shard map ``epoch``."""
    return all((lease := leases.get(gpu)) is not None and lease.epoch == epoch for gpu in gpus)


def test_workers_follow_the_shard_map_without_a_restart(
        spare_url: str, settings: Settings, tmp_path: Path) -> None:
    with own_cluster(settings, spare_url, tmp_path, gpus=2, shard_count=16) as cluster:
        client = cluster.settings.redis_client()
        store, leases = ShardMapStore(client), LeaseStore(client)
        entity = entity_owned_by(client, GPU0, "mover")
        index = shard_index(entity, 16)
        alloc.apply_async(kwargs={"entity_id": entity, "name": "keep", "shape": [2]}).get(
            timeout=TIMEOUT)
        log = new_log()
        pending = [record(entity, log, seq) for seq in range(40)]
        # When the entity's shard is given to GPU 1 while requests stream in
        moved_at = time.monotonic()
        epoch = store.assign({index: GPU1})
        pending += [record(entity, log, seq) for seq in range(40, 80)]
        # Then both workers consume by the new epoch within about a second
        wait_until(lambda: consume_by(leases, epoch), timeout=5)
        took = time.monotonic() - moved_at
        assert took < 2.5, f"workers took {took:.2f}s to follow the map"
        assert [lease.consuming for g in (GPU0, GPU1) if (lease := leases.get(g))] == [7, 9]
        # And the entity's requests now run on GPU 1; none was lost or run twice
        after = record(entity, log, 80).get(timeout=TIMEOUT)
        assert after["gpu"] == GPU1
        for result in pending:
            result.get(timeout=TIMEOUT)
        assert executions(client, log) == {f"{entity}:{seq}": 1 for seq in range(81)}
        # The device state did not move with it (moving it is the handoff's job): GPU 0
        # drops it at its next request rather than keep a stale copy, and records the loss,
        # so GPU 1 answers for it
        assert stats.apply_async(queue=GPU0).get(timeout=TIMEOUT)["shards"] == 7
        with pytest.raises(EntityStateLost, match="stopped being served by " + GPU0):
            read.apply_async(kwargs={"entity_id": entity, "name": "keep"}).get(timeout=TIMEOUT)
        # And when the shard comes back, the old buffer is reported gone, not served
        epoch = store.assign({index: GPU0})
        wait_until(lambda: consume_by(leases, epoch), timeout=5)
        with pytest.raises(EntityStateLost, match="stopped being served by " + GPU0):
            read.apply_async(kwargs={"entity_id": entity, "name": "keep"}).get(timeout=TIMEOUT)


def test_a_second_worker_for_a_served_gpu_refuses_to_start(
        spare_url: str, settings: Settings, tmp_path: Path) -> None:
    with own_cluster(settings, spare_url, tmp_path, gpus=1, shard_count=16) as cluster:
        env = cluster.settings.child_env()
        started = time.monotonic()
        done = gpu_tasks_cli("worker", "--gpu", "0", "--backend", "sim", env=env, timeout=60)
        assert done.returncode == 1
        assert f"{GPU0} is already served by gpu0@{NODE}" in done.stderr
        assert f"pid {cluster.workers[0].popen.pid}" in done.stderr
        assert time.monotonic() - started < 15  # refused at once, not after the lease's TTL
        # And the first one still serves, alone
        done_alloc = alloc.apply_async(kwargs={"entity_id": "y", "name": "b", "shape": [1]})
        assert done_alloc.get(timeout=TIMEOUT)["worker"] == f"gpu0@{NODE}"
        lease = LeaseStore(cluster.settings.redis_client()).get(GPU0)
        assert lease is not None and lease.pid == cluster.workers[0].popen.pid


def test_sigkill_of_a_whole_worker_every_request_completes_exactly_once(
        spare_url: str, settings: Settings, tmp_path: Path) -> None:
    # Given one GPU worker with a lease that would take a minute to expire, and 200
    # requests over 40 entities, the 20th of which is slow
    with own_cluster(settings, spare_url, tmp_path, gpus=1, lease_ttl_s=60.0) as cluster:
        client = cluster.settings.redis_client()
        log = new_log()
        entities = [f"kill-{i}" for i in range(40)]
        pending = []
        for seq in range(5):
            for e in entities:
                slow = len(pending) == 19
                pending.append(record(e, log, seq, seconds=3.0 if slow else 0.0))
        # When the whole worker (main process and pool child) is SIGKILLed while the slow
        # request runs
        wait_until(lambda: client.get(f"{log}:running"), timeout=TIMEOUT)
        victim = cluster.workers[0]
        pool_child = psutil.Process(victim.popen.pid).children()[0]
        victim.signal_group(signal.SIGKILL)
        victim.popen.wait(10)
        victim.log_file.close()
        wait_until(lambda: not pool_child.is_running() or
                   pool_child.status() == psutil.STATUS_ZOMBIE, timeout=10)
        # And it is started again
        restarted_at = time.monotonic()
        cluster.workers[0] = cluster.start_worker(0)
        # Then every request completes within 30 s: the new worker took the lease over at
        # once (its holder's process is gone) and put back what the old one had taken
        for result in pending:
            result.get(timeout=max(1.0, 30 - (time.monotonic() - restarted_at)))
        assert time.monotonic() - restarted_at < 30
        assert "took over the lease" in cluster.workers[0].log_tail(20_000)
        # And each ran, in order per entity; only requests of the batch in flight that had
        # finished without their results stored yet ran again (at least once, redelivered)
        ran = client.lrange(log, 0, -1)
        counts = Counter(x.decode() for x in ran)
        assert set(counts) == {f"{e}:{seq}" for e in entities for seq in range(5)}
        again = [k for k, n in counts.items() if n > 1]
        assert all(counts[k] == 2 for k in again), counts
        assert len(again) < cluster.settings.fetch_max_requests, again
        order: dict[str, list[int]] = defaultdict(list)
        for item in ran:
            e, seq = item.decode().rsplit(":", 1)
            order[e].append(int(seq))
        assert all(seqs == sorted(seqs) for seqs in order.values())


def test_a_frozen_worker_loses_its_lease_then_resumes(
        spare_url: str, settings: Settings, tmp_path: Path) -> None:
    with own_cluster(settings, spare_url, tmp_path, gpus=1, shard_count=16) as cluster:
        client = cluster.settings.redis_client()
        env = cluster.settings.child_env()
        main = cluster.workers[0].popen.pid
        from gpu_tasks.control.status import snapshot

        # When the worker's main process (the one that fetches and renews) is frozen
        os.kill(main, signal.SIGSTOP)
        try:
            frozen_at = time.monotonic()
            row = wait_until(lambda: (g := snapshot(client).gpus[0]) and not g.alive and g,
                             timeout=3 * cluster.settings.lease_ttl_s)
            # Then within the lease's TTL it no longer counts as alive
            assert time.monotonic() - frozen_at < cluster.settings.lease_ttl_s + 2
            assert not row.consuming
            # And work sent meanwhile is shown as waiting with nothing consuming it
            log = new_log()
            waiting = record("frozen-user", log)
            shown = gpu_tasks_cli("status", env=env)
            assert "NO" in shown.stdout and "1 requests wait in its queues and nothing " \
                "consumes them: no worker holds its lease" in shown.stdout
        finally:
            os.kill(main, signal.SIGCONT)
        # When it thaws, nobody having taken its GPU, it takes the lease back and serves
        assert waiting.get(timeout=TIMEOUT)["gpu"] == GPU0
        wait_until(lambda: snapshot(client).gpus[0].alive, timeout=10)
        assert executions(client, log) == {"frozen-user:0": 1}


def test_a_worker_whose_lease_was_taken_over_stops_and_exits_3(
        spare_url: str, settings: Settings, tmp_path: Path) -> None:
    with own_cluster(settings, spare_url, tmp_path, gpus=1, shard_count=16) as cluster:
        client = cluster.settings.redis_client()
        worker = cluster.workers[0]
        # When another worker's token replaces this one's (it was presumed dead)
        client.hset(f"gpu-tasks:lease:{GPU0}", "token", "another-worker")
        # Then it stops consuming and exits with status 3, saying why
        assert worker.popen.wait(30) == 3
        assert "lost the GPU's lease to another worker" in worker.log_tail(20_000)
        # And work sent afterwards waits in its queue for the GPU's rightful worker
        log = new_log()
        waiting = record("after-the-loss", log)
        wait_until(lambda: client.llen(shard_name(shard_index("after-the-loss", 16))) == 1,
                   timeout=10)
        assert executions(client, log) == {}
        client.delete(f"gpu-tasks:lease:{GPU0}")
        cluster.workers[0] = cluster.start_worker(0)
        assert waiting.get(timeout=TIMEOUT)["gpu"] == GPU0
        assert executions(client, log) == {"after-the-loss:0": 1}


@pytest.mark.slow  # a flooded shard drained beside the others
def test_no_shard_starves_while_another_is_flooded(
        spare_url: str, settings: Settings, tmp_path: Path) -> None:
    # Given one GPU owning all 1024 shards, 5,000 requests queued for one entity and
    # 50 for an entity of another shard, all waiting before the worker starts
    own = settings.replace(redis_url=spare_url, data_dir=str(tmp_path / "gpu-tasks"))
    cluster = LocalCluster(own, gpus=1, backend="sim", flower=False)
    client = own.redis_client()
    try:
        cluster.ensure_shard_map()
        log = new_log()
        flood, trickle = "flood-user", "trickle-user"
        assert shard_index(flood, 1024) != shard_index(trickle, 1024)
        pipe = client.pipeline(transaction=False)
        for seq in range(5000):
            pipe.lpush(shard_name(shard_index(flood, 1024)), raw_task_message(
                "tests.record", {"entity_id": flood, "log": log, "seq": seq},
                shard_name(shard_index(flood, 1024)))[1])
        for seq in range(50):
            pipe.lpush(shard_name(shard_index(trickle, 1024)), raw_task_message(
                "tests.record", {"entity_id": trickle, "log": log, "seq": seq},
                shard_name(shard_index(trickle, 1024)))[1])
        pipe.execute()
        # When the worker drains them
        cluster.start()
        wait_until(lambda: client.llen(log) >= 5050, timeout=300, interval=0.5,
                   what=lambda: f"{client.llen(log)} of 5050 ran")
        # Then each of the 50 ran before half the flood had
        ran = [x.decode() for x in client.lrange(log, 0, -1)]
        last_trickle = max(i for i, x in enumerate(ran) if x.startswith(trickle))
        flood_before = sum(1 for x in ran[:last_trickle] if x.startswith(flood))
        assert flood_before < 2500, f"{flood_before} flood requests ran before the 50th other"
        assert Counter(ran) == {**{f"{flood}:{s}": 1 for s in range(5000)},
                                **{f"{trickle}:{s}": 1 for s in range(50)}}
    finally:
        cluster.stop()


# -- arrows, extras ------------------------------------------------------------------------


def test_up_without_the_worker_extra_names_the_extra_to_install() -> None:
    code = ("import sys\n"
            "sys.modules['numpy'] = None  # as if only the light core were installed\n"
            "from gpu_tasks.cli import main\n"
            "main(['up', '--once'])\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    assert "pip install 'gpu-tasks[worker]'" in done.stderr
    assert "Traceback" not in done.stderr
