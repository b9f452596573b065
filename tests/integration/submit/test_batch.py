"""``gpu-tasks batch``: a cron batch checked whole, sent exactly once, with back-pressure.

Executions are counted in the workers (``tests.record`` appends to a Redis list each time
it runs), never inferred from results.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import redis

from gpu_tasks.control.shardmap import ShardMap, ShardMapStore
from gpu_tasks.local.cluster import LocalCluster
from gpu_tasks.local.redis_server import RedisServer
from gpu_tasks.settings import Settings
from gpu_tasks.submit.batch import batch_keys, task_id_for
from tests.conftest import REPO, gpu_tasks_cli, wait_until


def record_lines(log: str, count: int, *, prefix: str = "e") -> list[str]:
    return [json.dumps({"entity_id": f"{prefix}{i}", "task": "tests.record",
                        "kwargs": {"log": log, "seq": i}}) for i in range(count)]


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def executions(client: redis.Redis, log: str) -> Counter[str]:
    return Counter(v.decode() for v in client.lrange(log, 0, -1))


def run_batch(settings: Settings, *args: str, timeout: float = 300) -> tuple[int, dict, str]:
    done = gpu_tasks_cli("batch", *args, "--json", env=settings.child_env(), timeout=timeout)
    lines = done.stdout.strip().splitlines()
    summary = json.loads(lines[-1]) if lines else {}
    return done.returncode, summary, done.stderr


def start_batch(settings: Settings, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "gpu_tasks.cli", "batch", *args, "--json"],
                            env=settings.child_env(), cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def sent_lines(client: redis.Redis, batch_id: str) -> int:
    return int(client.bitcount(batch_keys(batch_id)[1]))


@pytest.fixture()
def idle(spare_url: str, settings: Settings) -> tuple[Settings, redis.Redis]:
    """A database with a shard map of two GPUs and no worker: what is sent stays queued."""
    client = redis.Redis.from_url(spare_url)
    ShardMapStore(client).create(ShardMap.balanced(["gpu.idle.0", "gpu.idle.1"], 64))
    return settings.replace(redis_url=spare_url), client


def queued(client: redis.Redis, shard_count: int = 64) -> int:
    pipe = client.pipeline()
    for i in range(shard_count):
        pipe.llen(f"shard-{i}")
    return sum(pipe.execute())


@pytest.mark.slow  # 10,000 requests through the four sim GPUs
def test_ten_thousand_lines_with_bad_ones_run_once_each(
        cluster: LocalCluster, settings: Settings, client: redis.Redis, tmp_path: Path) -> None:
    # Given 10,000 requests with bad lines scattered through them
    log = f"log-{uuid.uuid4().hex}"
    lines = record_lines(log, 10_000)
    bad = {17: "not json at all", 2500: json.dumps({"entity_id": "", "task": "tests.record",
                                                     "kwargs": {"log": log}}),
           5000: json.dumps({"entity_id": "x", "task": "tests.nosuch", "kwargs": {}}),
           7777: json.dumps({"entity_id": "x", "task": "tests.record",
                             "kwargs": {"log": log, "sequence": 1}}),
           9999: json.dumps({"entity_id": "x", "task": "tests.record", "kwargs": [1]})}
    for index, text in bad.items():
        lines[index] = text
    source = write(tmp_path / "nightly.jsonl", lines)
    # When it is sent and waited for
    code, summary, _ = run_batch(settings, str(source), "--wait", "--timeout", "240",
                                 "--results", str(tmp_path / "out.jsonl"))
    # Then the bad lines are reported by number and reason, and the rest ran exactly once
    assert code == 1, summary
    reasons = {r["line"]: r["reason"] for r in summary["rejections"]}
    assert set(reasons) == {i + 1 for i in bad}
    assert "not JSON" in reasons[18]
    assert "entity_id" in reasons[2501]
    assert "tests.nosuch" in reasons[5001]
    assert "sequence" in reasons[7778]
    assert "kwargs must be an object" in reasons[10_000]
    assert summary["sent"] == summary["succeeded"] == 10_000 - len(bad)
    assert summary["failed"] == summary["unfinished"] == 0
    ran = executions(client, log)
    assert len(ran) == 10_000 - len(bad) and set(ran.values()) == {1}
    assert f"e1:{1}" in ran and f"e{17}:{17}" not in ran
    # And --results has one line per input line, in order
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rows] == list(range(1, 10_001))
    assert rows[17]["outcome"] == "rejected" and rows[0]["state"] == "SUCCESS"
    assert rows[0]["result"]["result"] == {"seq": 0}


def test_a_rerun_sends_nothing_twice(cluster: LocalCluster, settings: Settings,
                                     client: redis.Redis, tmp_path: Path) -> None:
    log = f"log-{uuid.uuid4().hex}"
    source = write(tmp_path / "b.jsonl", record_lines(log, 300))
    code, first, _ = run_batch(settings, str(source), "--wait", "--timeout", "120")
    assert code == 0 and first["sent"] == 300
    # When the same file runs again (same content, so the same batch id)
    code, again, _ = run_batch(settings, str(source), "--wait", "--timeout", "120")
    # Then nothing is sent, every line is reported as already sent, and the results of the
    # first run are found again
    assert code == 0, again
    assert (again["batch_id"], again["sent"], again["skipped"]) == (first["batch_id"], 0, 300)
    assert again["succeeded"] == 300
    assert len(executions(client, log)) == 300


@pytest.mark.slow  # a batch SIGKILLed half way, then run again
def test_sigkill_half_way_then_rerun_runs_everything_exactly_once(
        cluster: LocalCluster, settings: Settings, client: redis.Redis, tmp_path: Path) -> None:
    # Given a batch slowed down by back-pressure, so that it is certainly mid-way when killed
    log = f"log-{uuid.uuid4().hex}"
    count = 3000
    source = write(tmp_path / "b.jsonl", record_lines(log, count))
    batch_id = f"kill-{uuid.uuid4().hex[:8]}"
    run = start_batch(settings, str(source), "--batch-id", batch_id, "--max-backlog", "100")
    wait_until(lambda: sent_lines(client, batch_id) >= 600, timeout=120,
               what=lambda: f"sent {sent_lines(client, batch_id)}")
    # When it is SIGKILLed half way
    run.send_signal(signal.SIGKILL)
    run.wait(10)
    before = sent_lines(client, batch_id)
    assert 0 < before < count
    # And re-run (waiting for the dead run's lock to expire)
    code, summary, err = run_batch(settings, str(source), "--batch-id", batch_id,
                                   "--lock-wait", "30", "--wait", "--timeout", "180")
    # Then the re-run sent exactly what the first had not, and every request ran once
    assert code == 0, (summary, err)
    assert summary["skipped"] >= before and summary["sent"] + summary["skipped"] == count
    assert summary["succeeded"] == count
    ran = executions(client, log)
    assert len(ran) == count and set(ran.values()) == {1}, ran.most_common(3)


def test_an_overlapping_run_exits_with_a_clear_message_or_waits(
        idle: tuple[Settings, redis.Redis], tmp_path: Path) -> None:
    settings, client = idle
    source = write(tmp_path / "b.jsonl", record_lines("log", 400))
    batch_id = "overlap"
    # Given a run held back by a full GPU (nothing consumes here)
    first = start_batch(settings, str(source), "--batch-id", batch_id, "--max-backlog", "100")
    try:
        wait_until(lambda: client.exists(batch_keys(batch_id)[2]) and queued(client) > 0,
                   timeout=30)
        # When a second run of the same batch starts
        code, _, err = run_batch(settings, str(source), "--batch-id", batch_id)
        # Then it sends nothing and says who holds the batch
        assert code == 2
        assert "being sent by another run" in err and f"pid {first.pid}" in err
        assert sent_lines(client, batch_id) == queued(client)
    finally:
        first.kill()
        first.wait(10)
    # And a run that waits for the lock picks up after the holder is gone, sending each
    # line once
    client.delete(*[f"shard-{i}" for i in range(64)])  # a GPU consumed them
    code, summary, err = run_batch(settings, str(source), "--batch-id", batch_id,
                                   "--lock-wait", "30", "--max-backlog", "1000")
    assert code == 0, err
    assert summary["sent"] + summary["skipped"] == 400
    assert queued(client) == summary["sent"]


def test_backpressure_holds_the_batch_until_the_backlog_drains(
        idle: tuple[Settings, redis.Redis], tmp_path: Path) -> None:
    settings, client = idle
    source = write(tmp_path / "b.jsonl", record_lines("log", 1000))
    # Given a batch whose GPUs take at most 200 queued requests each
    run = start_batch(settings, str(source), "--batch-id", "bp", "--max-backlog", "200")
    try:
        # Then it stops sending once its GPUs are full
        wait_until(lambda: sent_lines(client, "bp") > 0, timeout=30)
        # (no condition says "it sent no more": this second is the window in which a batch
        # that was not held back would have sent the rest, the fault this test looks for)
        time.sleep(1.0)
        held = queued(client)
        assert 0 < held <= 400 and run.poll() is None
        # When a consumer drains the queues, it goes on, and finishes
        while run.poll() is None:
            client.delete(*[f"shard-{i}" for i in range(64)])
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.wait(0.05)  # until it finishes, draining every 50 ms meanwhile
        summary = json.loads(run.communicate(timeout=30)[0].strip().splitlines()[-1])
    finally:
        run.kill()
    assert run.returncode == 0
    assert summary["sent"] == 1000


def test_fail_fast_stops_before_sending_more(idle: tuple[Settings, redis.Redis],
                                              tmp_path: Path) -> None:
    settings, client = idle
    source = write(tmp_path / "b.jsonl", record_lines("log", 1000))
    code, summary, _ = run_batch(settings, str(source), "--max-backlog", "100", "--fail-fast")
    assert code == 1
    assert "over the limit of 100" in summary["stopped"] and "gpu.idle." in summary["stopped"]
    assert 0 < summary["sent"] == queued(client) < 1000


def test_wait_says_which_requests_are_unfinished(idle: tuple[Settings, redis.Redis],
                                                  tmp_path: Path) -> None:
    settings, _ = idle
    source = write(tmp_path / "b.jsonl", record_lines("log", 20))
    started = time.monotonic()
    code, summary, _ = run_batch(settings, str(source), "--wait", "--timeout", "1")
    assert code == 3
    assert time.monotonic() - started < 30
    assert summary["unfinished"] == summary["unfinished_queued"] == 20
    assert summary["unfinished_lines"][0]["where"] == "queued"


def test_csv_with_a_header_and_task_default(cluster: LocalCluster, settings: Settings,
                                            client: redis.Redis, tmp_path: Path) -> None:
    log = f"log-{uuid.uuid4().hex}"
    source = tmp_path / "b.csv"
    source.write_text("entity_id,log,seq\n" + "".join(f"c{i},{log},{i}\n" for i in range(50))
                      + "c50,oops\n")
    code, summary, _ = run_batch(settings, str(source), "--task", "tests.record", "--wait")
    assert code == 1
    assert summary["rejections"] == [{"line": 52, "reason": "2 fields where the header has 3"}]
    assert summary["succeeded"] == 50
    assert sorted(executions(client, log)) == sorted(f"c{i}:{i}" for i in range(50))


def test_a_batch_id_reused_for_another_file_is_refused(idle: tuple[Settings, redis.Redis],
                                                        tmp_path: Path) -> None:
    settings, client = idle
    first = write(tmp_path / "a.jsonl", record_lines("log", 5))
    second = write(tmp_path / "b.jsonl", record_lines("log", 6))
    assert run_batch(settings, str(first), "--batch-id", "nightly")[0] == 0
    code, _, err = run_batch(settings, str(second), "--batch-id", "nightly")
    assert code == 2 and "different file" in err
    assert queued(client) == 5


def test_stdin_and_deterministic_task_ids(idle: tuple[Settings, redis.Redis]) -> None:
    settings, client = idle
    text = "\n".join(record_lines("log", 3)) + "\n"
    done = subprocess.run([sys.executable, "-m", "gpu_tasks.cli", "batch", "-", "--json"],
                          input=text, env=settings.child_env(), cwd=REPO, text=True,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["source"] == "-" and summary["sent"] == 3
    ids = {json.loads(m)["headers"]["id"] for i in range(64)
           for m in client.lrange(f"shard-{i}", 0, -1)}
    assert ids == {task_id_for(summary["batch_id"], n) for n in (1, 2, 3)}


def test_usage_errors_exit_2(idle: tuple[Settings, redis.Redis], tmp_path: Path) -> None:
    settings, _ = idle
    done = gpu_tasks_cli("batch", str(tmp_path / "missing.jsonl"), env=settings.child_env())
    assert done.returncode == 2 and "no such file" in done.stderr


@pytest.mark.parametrize("fault", ["stopped", "hung"])
def test_redis_down_or_hung_fails_within_the_timeout(fault: str, settings: Settings,
                                                     tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        client = redis.Redis.from_url(server.url)
        ShardMapStore(client).create(ShardMap.balanced(["gpu.x.0"], 16))
        own = settings.replace(redis_url=server.url, redis_timeout_s=1.0)
        source = write(tmp_path / "b.jsonl", record_lines("log", 10))
        if fault == "stopped":
            server.stop()
        else:
            os.kill(server.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            code, _, err = run_batch(own, str(source), timeout=60)
            took = time.monotonic() - started
        finally:
            if fault == "hung":
                os.kill(server.process.pid, signal.SIGCONT)
    assert code == 2, err
    assert "BrokerUnavailable" in err and "Traceback" not in err
    assert took < 15
