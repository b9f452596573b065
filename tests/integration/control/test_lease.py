"""GPU leases in a real Redis: one holder at a time, judged on Redis's clock, taken over
at once from a dead process of this host and on expiry from elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import redis

from gpu_tasks.control.lease import Holder, LeaseStore, redis_now_ms
from gpu_tasks.control.shardmap import ShardMap, ShardMapStore
from gpu_tasks.errors import LeaseHeld
from tests.conftest import wait_until

GPU = "gpu.n.0"


@pytest.fixture()
def leases(spare_url: str) -> LeaseStore:
    return LeaseStore(redis.Redis.from_url(spare_url))


def test_one_holder_at_a_time_and_renewal_reports_the_maps_epoch(leases: LeaseStore) -> None:
    first, second = Holder("gpu0@n"), Holder("gpu0@n")
    taken = leases.claim(GPU, first, 10)
    assert taken.held and taken.map_epoch == -1  # no shard map yet
    refused = leases.claim(GPU, second, 10)
    assert not refused.held and refused.holder_token == first.token
    epoch = ShardMapStore(leases.client).create(ShardMap.balanced([GPU], 4))
    lease = leases.get(GPU)
    assert lease is not None
    renewed = leases.claim(GPU, first, 10, epoch=epoch, consuming=4)
    assert renewed.held and renewed.map_epoch == epoch
    again = leases.get(GPU)
    assert again is not None
    assert (again.token, again.worker, again.pid) == (first.token, "gpu0@n", os.getpid())
    assert (again.epoch, again.consuming) == (epoch, 4)
    assert again.acquired_ms == lease.acquired_ms and again.renewed_ms >= lease.renewed_ms
    assert 9_000 < leases.client.pttl(f"gpu-tasks:lease:{GPU}") <= 10_000
    assert not leases.release(GPU, second.token) and leases.get(GPU) is not None
    assert leases.release(GPU, first.token) and leases.get(GPU) is None
    assert leases.all() == {GPU: None}  # remembered as a GPU, no longer held


def test_a_lease_not_renewed_expires_by_redis_clock_and_is_free_again(
        leases: LeaseStore) -> None:
    first, second = Holder("gpu0@n"), Holder("gpu0@n")
    leases.claim(GPU, first, 0.3)
    wait_until(lambda: leases.get(GPU) is None, timeout=5)
    assert leases.claim(GPU, second, 10).held
    # The first holder finds it taken when it comes back
    back = leases.claim(GPU, first, 10)
    assert not back.held and back.holder_token == second.token


def test_ages_come_from_redis_clock_not_this_hosts(leases: LeaseStore,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    leases.claim(GPU, Holder("gpu0@n"), 10)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)  # this host an hour ahead
    lease = leases.get(GPU)
    assert lease is not None
    assert lease.age_s < 2 and 8 < lease.expires_in_s <= 10
    assert abs(lease.now_ms - redis_now_ms(leases.client)) < 2000


def test_a_starting_worker_takes_over_at_once_from_a_dead_process_of_this_host(
        leases: LeaseStore) -> None:
    # Given a lease held by a process of this host that has exited
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = Holder("gpu0@n", pid=int(gone.stdout), pid_start="1")
    leases.claim(GPU, dead, 60)
    # When a new worker starts, then it takes the lease at once, not in 60 s
    started = time.monotonic()
    taken = leases.take(GPU, Holder("gpu0@n"), 60)
    assert taken.held and time.monotonic() - started < 2


def test_a_reused_pid_is_not_mistaken_for_the_live_holder(leases: LeaseStore) -> None:
    # Our own pid, but a start time that is not ours: the holder was another process
    ghost = Holder("gpu0@n", pid=os.getpid(), pid_start="1")
    leases.claim(GPU, ghost, 60)
    assert leases.take(GPU, Holder("gpu0@n"), 60).held


def test_a_starting_worker_refuses_while_a_live_process_of_this_host_holds_it(
        leases: LeaseStore) -> None:
    leases.claim(GPU, Holder("gpu0@n"), 60)  # this very process: alive
    started = time.monotonic()
    with pytest.raises(LeaseHeld, match=rf"{GPU} is already served by gpu0@n \(pid {os.getpid()}"):
        leases.take(GPU, Holder("gpu0@n"), 60)
    assert time.monotonic() - started < 2


def test_a_holder_elsewhere_that_renews_is_refused_and_one_that_does_not_is_waited_out(
        leases: LeaseStore) -> None:
    # A live holder on another host keeps renewing: refused as soon as a renewal is seen
    remote = Holder("gpu0@n", host="elsewhere")
    leases.claim(GPU, remote, 2)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(0.2):
            leases.claim(GPU, remote, 2)

    renewer = threading.Thread(target=renew)
    renewer.start()
    try:
        with pytest.raises(LeaseHeld, match="keeps renewing"):
            leases.take(GPU, Holder("gpu0@n"), 2, poll_s=0.05)
    finally:
        stop.set()
        renewer.join()
    # A holder elsewhere that stopped renewing: the newcomer waits for the expiry
    started = time.monotonic()
    assert leases.take(GPU, Holder("gpu0@n"), 2, poll_s=0.05).held
    assert time.monotonic() - started < 2.5
