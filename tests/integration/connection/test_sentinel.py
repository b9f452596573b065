"""Redis Sentinel: a deployment on ``sentinel://`` keeps serving through a master failover.

A real master and replica, three real Sentinels (quorum 2, down after 1 s), two sim GPU
workers and a producer (this process) all on the one ``sentinel://`` URL; the master is
killed with SIGKILL while requests are being sent and run. Executions are counted in a
file, outside Redis, since Redis itself is what fails; replication is asynchronous, so
what the old master acknowledged and had not yet passed to the replica may be lost
(ops/README.md, "Redis Sentinel"), and a request running when its worker lost the
connection may run again.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import redis

from gpu_tasks.errors import BrokerUnavailable
from gpu_tasks.settings import Settings
from tests import usertasks
from tests.conftest import gpu_tasks_cli, own_cluster, wait_until
from tests.support.flowerclient import every_flower_page
from tests.support.redisnodes import SentinelSet

DATA_PASSWORD = "data-pw-7c1e9a"
SENTINEL_PASSWORD = "sentinel-pw-52b8d0"
KILL_AT_S = 4.0
"""When the master is killed, after the first request was acknowledged."""
RUN_S = 16.0
"""How long the producer sends (the failover takes about 2 s of it)."""


def executions(path: Path) -> Counter[int]:
    """How many times each request ran (``tests.record_file``'s lines)."""
    if not path.exists():
        return Counter()
    return Counter(int(line.split()[0]) for line in path.read_text().splitlines())


def settled(nodes: SentinelSet, gpus: list[str], log: Path) -> bool:
    """Whether nothing more can come back: no request waits in a shard or GPU queue of the
    master, and every request a worker holds (its unacknowledged ones) has run."""
    try:
        client = nodes.master.admin()
        return _settled(client, gpus, log)
    except (AssertionError, redis.RedisError):  # no Sentinel or master answers just now
        return False


def _settled(client: redis.Redis, gpus: list[str], log: Path) -> bool:
    if next(iter(client.scan_iter("shard-*", count=1000)), None) is not None:
        return False
    if any(client.llen(gpu) for gpu in gpus):
        return False
    ran = executions(log)
    for gpu in gpus:
        for raw in client.hvals(f"gpu-tasks:unacked:{gpu}"):
            message = json.loads(raw)[0]
            kwargs = json.loads(base64.b64decode(message["body"]))[1]
            if not ran[kwargs.get("seq", -1)]:
                return False
    return True


def first_run_after(path: Path, when: float, seqs: set[int]) -> float:
    """Unix time of the first execution of one of ``seqs`` after ``when``."""
    times = [float(t) for s, t in (line.split() for line in path.read_text().splitlines())
             if int(s) in seqs and float(t) > when]
    return min(times)


@pytest.mark.slow  # a Sentinel failover under load
def test_a_sentinel_deployment_keeps_serving_through_a_master_failover(
        tmp_path: Path, settings: Settings) -> None:
    with SentinelSet(tmp_path / "redis", password=DATA_PASSWORD,
                     sentinel_password=SENTINEL_PASSWORD) as nodes, \
            own_cluster(settings, nodes.url, tmp_path, gpus=2) as cluster:
        old_master = nodes.master
        log = tmp_path / "executions"
        # Given requests being sent and run, through the Sentinels
        acked: dict[int, float] = {}
        task_ids: dict[int, str] = {}
        refused: dict[int, str] = {}
        promoted_at: list[float] = []
        killed_at = 0.0

        def promoted() -> bool:
            try:
                return nodes.master_address()[1] != old_master.port
            except AssertionError:  # no Sentinel answers just now
                return False

        def watch_failover() -> None:
            with contextlib.suppress(AssertionError):  # never: promoted_at stays empty
                wait_until(promoted, timeout=60, interval=0.05)
                promoted_at.append(time.monotonic())

        started = time.monotonic()
        seq = 0
        while time.monotonic() - started < RUN_S:
            if not killed_at and time.monotonic() - started >= KILL_AT_S:
                assert executions(log), "nothing ran before the kill"
                # When the master is killed mid-run (no shutdown, nothing more replicated)
                old_master.kill()
                killed_at, killed_at_unix = time.monotonic(), time.time()
                threading.Thread(target=watch_failover, daemon=True).start()
            try:
                task_ids[seq] = usertasks.record_file.apply_async(kwargs={
                    "entity_id": f"e{seq % 40}", "path": str(log), "seq": seq,
                    "seconds": 0.02}).id
                acked[seq] = time.monotonic()
            except BrokerUnavailable as exc:
                refused[seq] = str(exc)
            seq += 1
            time.sleep(0.02)  # the producer's pace (one request per 20 ms), not a wait
        assert promoted_at, "the Sentinels never promoted the replica"
        failover_s = promoted_at[0] - killed_at

        # Then, without restarting the producer or the workers, everything acknowledged
        # by the new master runs, and the workers are the same processes
        after = [s for s, t in acked.items() if t > promoted_at[0]]
        assert len(after) > 50, f"only {len(after)} requests were sent after the failover"
        wait_until(lambda: all(executions(log)[s] for s in after), timeout=120,
                   what=lambda: f"{sum(1 for s in after if not executions(log)[s])} of "
                                f"{len(after)} requests sent after the failover never ran")
        # What else comes back (redelivered, restored) has come back once nothing waits and
        # every request a worker holds has run. A request held by a worker that lost it when
        # the connection dropped stays held until the visibility timeout, so this gives up
        # waiting after 3 s (and what never came back is counted below) instead of failing.
        with contextlib.suppress(AssertionError):
            wait_until(lambda: settled(nodes, cluster.queues, log), timeout=3,
                       interval=0.1)
        ran = executions(log)
        first_after = min(t for s, t in acked.items() if t > killed_at)
        before = [s for s, t in acked.items() if t <= killed_at]
        lost = sorted(s for s in acked if not ran[s])
        duplicated = sorted(s for s, n in ran.items() if n > 1)
        refused_ran = sorted(s for s in refused if ran[s])
        served_again_s = first_run_after(log, killed_at_unix, set(after)) - killed_at_unix
        # A request that ran while its worker lost the connection may have no stored result:
        # it stays among the GPU's unacknowledged requests, and runs again (storing one)
        # when its worker restarts, or after the visibility timeout
        master = nodes.master.admin()
        with master.pipeline(transaction=False) as pipe:
            for s in acked:
                pipe.exists(f"celery-task-meta-{task_ids[s]}")
            stored = dict(zip(acked, pipe.execute(), strict=True))
        no_result = sorted(s for s in acked if ran[s] and not stored[s])
        print(f"\nsentinel failover: {seq} requests sent over {RUN_S:g} s, master killed at "
              f"{KILL_AT_S:g} s with {len(before)} acknowledged; Sentinels promoted the "
              f"replica {failover_s:.2f} s after the kill; first request acknowledged "
              f"{first_after - killed_at:.2f} s after the kill, first one run "
              f"{served_again_s:.2f} s after the kill; {len(refused)} refused "
              f"(BrokerUnavailable) meanwhile, {len(refused_ran)} of which ran anyway; "
              f"acknowledged and lost: {len(lost)} {lost[:10]}; ran twice or more: "
              f"{len(duplicated)} {duplicated[:10]}; ran without a stored result: "
              f"{len(no_result)} {no_result[:10]}")
        assert all(w.alive() for w in cluster.workers), [w.log_tail() for w in cluster.workers]
        # Only what the old master acknowledged can be lost: the new one is the only master
        # from then on
        assert set(lost) <= set(before)
        # The replica on loopback lags by far less than the 20 ms between two sends:
        # at most the last couple of acknowledgements can be lost
        assert len(lost) <= 3, lost
        # A request runs twice only if its worker lost the connection while holding it
        # (at most one running plus one prefetched per GPU, each redelivered once)
        assert len(duplicated) <= 4, duplicated
        assert len(no_result) <= 4, no_result
        # A refusal that said "nothing was enqueued" was right
        assert not [s for s in refused_ran if "nothing was enqueued" in refused[s]]

        # And a new producer process (the CLI), status and results work through the
        # new master
        env = cluster.settings.child_env()
        done = gpu_tasks_cli("submit", "alloc", "--entity", "after-failover", "--kwargs",
                             '{"name": "x", "shape": [2]}', "--wait", "--json", env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert json.loads(done.stdout)["result"]["buffer"]["name"] == "x"
        result = usertasks.record_file.apply_async(kwargs={
            "entity_id": "e1", "path": str(log), "seq": -1}).get(timeout=60)
        assert result["result"] == {"seq": -1}
        status = gpu_tasks_cli("status", "--json", env=env)
        assert status.returncode == 0, status.stderr
        gpus = json.loads(status.stdout)["gpus"]
        assert sorted(g["gpu"] for g in gpus if g["consuming"]) == sorted(cluster.queues)
        # And Flower watches it through the Sentinels too
        pages = every_flower_page(cluster)
        # And no password was printed, logged or shown anywhere (Flower's pages, the
        # workers' configuration with the Sentinels' login in its transport options)
        outputs = [done.stdout, done.stderr, status.stdout, status.stderr, *pages,
                   *(p.read_text(errors="replace") for p in cluster.log_dir.glob("*.log"))]
        for secret in (DATA_PASSWORD, SENTINEL_PASSWORD):
            assert not [o[max(0, o.index(secret) - 300):o.index(secret) + 50]
                        for o in outputs if secret in o]
        assert not [m for m in refused.values()
                    if DATA_PASSWORD in m or SENTINEL_PASSWORD in m]


@pytest.mark.parametrize("url, why", [
    ("sentinel://127.0.0.1:26379/0", "master_name"),
    ("sentinel://:a@127.0.0.1:1/0;sentinel://:b@127.0.0.1:2/0?master_name=m", "different"),
])
def test_a_sentinel_url_without_what_it_needs_is_refused_at_start(url: str, why: str) -> None:
    done = gpu_tasks_cli("--redis-url", url, "status")
    assert done.returncode == 1 and why in done.stderr, done.stderr
    assert ":a@" not in done.stderr and ":b@" not in done.stderr
