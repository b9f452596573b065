"""An expiring token lock in Redis: claim it if free or ours, renew it, release it if ours.

The lock is one key holding its holder's token, with an expiry: a holder that dies or
hangs frees it by itself after ``ttl_s``, and only the holder's token renews or drops it.
Two things are this lock: the coordinator lease (``gpu-tasks:coordinator``: of several
coordinators one acts) and a batch run's lock (``gpu-tasks:batch:<id>:lock``: one run of
a batch at a time). A GPU's lease (:mod:`gpu_tasks.control.lease`) is richer (holder
fields, shard map epoch, when it was last seen) and has its own scripts.
"""

from __future__ import annotations

import redis

from gpu_tasks.control import scripts


class ExpiringLock:
    """The lock at ``key``, as held by ``token``; each call is one atomic Lua script."""

    def __init__(self, client: redis.Redis, key: str, token: str, ttl_s: float) -> None:
        self.client = client
        self.key = key
        self.token = token
        """What the key holds while the lock is ours (unique per holder)."""
        self.ttl_s = ttl_s
        """How long the lock lasts from each claim or renewal."""
        self._claim = scripts.register(client, "lock_claim")
        self._renew = scripts.register(client, "lock_renew")
        self._release = scripts.register(client, "lock_release")

    @property
    def ttl_ms(self) -> int:
        return int(self.ttl_s * 1000)

    def claim(self) -> bool:
        """Take the lock if it is free, or renew it if it is ours: True if it is ours now,
        False while another holder has it."""
        return bool(self._claim(keys=[self.key], args=[self.token, self.ttl_ms]))

    def renew(self) -> bool:
        """Extend the lock if it is still ours; False if it is not (it expired, and may
        have been taken by another). Unlike :meth:`claim` it never takes it back."""
        return bool(self._renew(keys=[self.key], args=[self.token, self.ttl_ms]))

    def release(self) -> bool:
        """Drop the lock if it is ours: True if it was."""
        return bool(self._release(keys=[self.key], args=[self.token]))
