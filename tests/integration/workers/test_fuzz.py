"""Fuzzing (issue 9), a few hundred cases: every built-in task's arguments, valid and not,
and raw queue bytes, against a private two-GPU cluster of sim workers. Every request is
answered with a result or a ``gpu_tasks.errors`` class in time, every raw message is
dead-lettered or answered and the good request after it runs, and no worker dies.

The strategies and the judging live in ``benchmarks/fuzz.py``; ``make chaos``
(``benchmarks/chaos.py``) runs the same with 10,000 cases and more (hypothesis profile
``chaos``). Hypothesis prints the failing example; the assertion message holds the Python
lines (or the raw bytes and queue) that reproduce it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from benchmarks import fuzz
from gpu_tasks.local.redis_server import RedisServer
from gpu_tasks.settings import Settings
from tests.conftest import _spare_dbs, own_cluster

# A few hundred cases against a private cluster; the last test counts what the first two ran,
# so the module is marked as a whole.
pytestmark = pytest.mark.slow

GPUS = 2
CI = hsettings.get_profile("ci")
RAW_EXAMPLES = 80
"""Raw examples of one to four messages each, every one followed by a good request."""


@pytest.fixture(scope="module")
def fuzzer(settings: Settings, redis_server: RedisServer,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[fuzz.Fuzzer]:
    """A private cluster (its own Redis database), so a failure here leaves the session's
    cluster alone; one fuzzer for the module, so its worker checks span every test."""
    url = f"redis://127.0.0.1:{redis_server.port}/{next(_spare_dbs)}"
    redis.Redis.from_url(url).flushdb()
    with own_cluster(settings, url, tmp_path_factory.mktemp("fuzz"), gpus=GPUS,
                     max_message_bytes=1 << 20) as cluster:
        client = redis.Redis.from_url(url, socket_timeout=30)
        shard_count, owners = fuzz.owners_of(client)
        workers = [fuzz.Worker(q, p.popen.pid) for q, p in zip(cluster.queues, cluster.workers,
                                                                  strict=True)]
        yield fuzz.Fuzzer(client, workers, shard_count, owners, strict=True, timeout_s=30.0)


@CI
@given(batch=fuzz.request_batches())
def test_every_request_is_answered_with_a_result_or_a_typed_error(
        fuzzer: fuzz.Fuzzer, batch: tuple[int, list[fuzz.Request]]) -> None:
    # Given a batch of requests (valid and not) over a few fresh entities
    # When they are all sent, then collected
    # Then each is answered with a result or a gpu_tasks.errors class, in time, and no worker
    # died (run_batch raises AssertionError with a reproducer otherwise)
    fuzzer.run_batch(*batch)


@hsettings(CI, max_examples=RAW_EXAMPLES)
@given(drawn=st.lists(fuzz.raw_cases(), min_size=1, max_size=4), gpu=st.integers(0, GPUS - 1))
def test_raw_bytes_are_dead_lettered_or_answered_and_the_next_request_runs(
        fuzzer: fuzz.Fuzzer, drawn: list[Any], gpu: int) -> None:
    # Given raw bytes (garbage, JSON, spoiled Celery envelopes) pushed onto a shard queue and a
    # GPU queue, each followed by a good request
    # Then each raw message is dead-lettered or answered, each good request runs, no worker
    # died
    fuzzer.run_raw(drawn, gpu)


def test_the_fuzzing_ran_its_cases_and_no_worker_died(fuzzer: fuzz.Fuzzer) -> None:
    tally = fuzzer.tally
    assert tally.cases >= 200, tally.summary()
    assert fuzzer.check_workers("(after the fuzzing)") == []
    assert tally.ok, tally.summary()
