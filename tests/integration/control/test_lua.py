"""The Lua scripts as files, and the expiring token lock built on three of them.

Every script is a ``.lua`` file that the loader knows by name, that says what it does,
its KEYS, its ARGV and its reply, and that names no key itself; the lock (the coordinator
lease and a batch run's lock) is claimed if free or ours, renewed and released only by
its holder, and frees itself when its holder stops renewing it."""

from __future__ import annotations

import re
from importlib.resources import files
from typing import get_args

import pytest
import redis

from gpu_tasks import keys
from gpu_tasks.control import scripts
from gpu_tasks.control.lock import ExpiringLock
from tests.conftest import wait_until

LUA = files("gpu_tasks.control") / "lua"


def _files() -> dict[str, str]:
    return {f.name.removesuffix(".lua"): f.read_text(encoding="utf-8")
            for f in LUA.iterdir() if f.name.endswith(".lua")}


def test_every_lua_file_is_a_script_the_loader_knows_and_the_other_way_round() -> None:
    assert sorted(_files()) == sorted(get_args(scripts.ScriptName))


@pytest.mark.parametrize("name", get_args(scripts.ScriptName))
def test_each_script_opens_with_what_it_does_its_keys_argv_and_reply(name: str) -> None:
    opening = re.match(r"(?:--[^\n]*\n)+", scripts.source(name))
    assert opening is not None
    header, code = opening[0], scripts.source(name)[opening.end():]
    assert "KEYS[1]" in header and "Returns" in header
    if "ARGV" in code:
        assert "ARGV" in header


@pytest.mark.parametrize("name", get_args(scripts.ScriptName))
def test_no_script_names_a_key(name: str) -> None:
    code = "\n".join(line for line in scripts.source(name).splitlines()
                     if not line.lstrip().startswith("--"))
    for prefix in (keys.PREFIX, "celery-task-meta-", "_kombu."):
        assert prefix not in code


@pytest.fixture()
def client(spare_url: str) -> redis.Redis:
    return redis.Redis.from_url(spare_url)


def test_one_holder_at_a_time_and_only_the_holder_renews_or_releases(
        client: redis.Redis) -> None:
    # Given a lock taken by a first holder
    first = ExpiringLock(client, "gpu-tasks:test:lock", "first", ttl_s=10)
    second = ExpiringLock(client, "gpu-tasks:test:lock", "second", ttl_s=10)
    assert first.claim()
    # Then a second holder can neither take, renew nor release it
    assert not second.claim() and not second.renew() and not second.release()
    assert client.get(first.key) == b"first"
    # And its holder renews it (claim renews too) and releases it
    client.pexpire(first.key, 1000)
    assert first.renew() and client.pttl(first.key) > 5000
    client.pexpire(first.key, 1000)
    assert first.claim() and client.pttl(first.key) > 5000
    assert first.release() and not client.exists(first.key)
    # When it is free, the second holder takes it
    assert second.claim() and not first.renew() and not first.release()
    assert client.get(first.key) == b"second"


def test_an_expired_lock_is_taken_by_a_claim_but_not_by_a_renewal(
        client: redis.Redis) -> None:
    lock = ExpiringLock(client, "gpu-tasks:test:lock", "holder", ttl_s=0.05)
    assert lock.claim()
    wait_until(lambda: not client.exists(lock.key), timeout=5)
    assert not lock.renew() and not client.exists(lock.key)
    assert lock.claim() and client.get(lock.key) == b"holder"
