"""The Redis Lua scripts, kept as ``.lua`` files in ``gpu_tasks/control/lua/``.

Each file starts with a comment saying what it does, its KEYS, its ARGV and what it
returns. No key is named inside the Lua: keys come in as KEYS (named in
:mod:`gpu_tasks.keys`), except the per-shard lost hashes of ``ledger_retire``, whose
common prefix comes in as ARGV because which shards come up is known only inside the
script. This module reads a file once (through :mod:`importlib.resources`, so an
installed wheel finds them as a checkout does) and registers it with redis-py:
:func:`register` answers a ``redis.commands.core.Script``, called like any as
``script(keys=..., args=..., client=pipeline)``.
"""

from __future__ import annotations

import functools
from importlib.resources import files
from typing import Literal

import redis
from redis.commands.core import Script

ScriptName = Literal[
    "batch_send",
    "dead_letter_answer",
    "ledger_retire",
    "lease_claim",
    "lease_release",
    "lock_claim",
    "lock_release",
    "lock_renew",
    "shardmap_assign",
    "shardmap_init",
    "shardmap_transition",
    "status_queues",
    "unacked_take",
]
"""Every script, by the name of its file (``lua/<name>.lua``)."""


@functools.cache
def source(name: ScriptName) -> str:
    """The text of ``lua/<name>.lua``, read once per process."""
    return (files("gpu_tasks.control") / "lua" / f"{name}.lua").read_text(encoding="utf-8")


def register(client: redis.Redis, name: ScriptName) -> Script:
    """Script ``name`` registered with ``client`` (loaded into Redis on its first call)."""
    return client.register_script(source(name))
