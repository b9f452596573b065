"""The shard map: which GPU queue owns each shard, kept in Redis with an epoch.

Layout in Redis (one deployment per Redis database):

- ``gpu-tasks:shardmap``       hash ``shard-<i>`` -> ``gpu.<node>.<gpu>``
- ``gpu-tasks:shardmap:meta``  hash ``shard_count``, ``epoch``

Every change goes through a Lua script, so the map and its epoch change together
and the epoch increases on every change. Producers keep a :class:`ShardMapCache`
and look at the epoch at most once per ``map_refresh_s``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from gpu_tasks.errors import ConfigError, ShardMapError

log = logging.getLogger(__name__)

NO_MAP = ("no shard map in Redis: create one with `gpu-tasks shards init --gpus N` "
          "(or `--queues Q1,Q2`)")

MAP_KEY = "gpu-tasks:shardmap"
META_KEY = "gpu-tasks:shardmap:meta"

_INIT = """
if ARGV[1] ~= '1' and redis.call('EXISTS', KEYS[2]) == 1 then
  return redis.error_reply('EXISTS shard map already exists')
end
local epoch = tonumber(redis.call('HGET', KEYS[2], 'epoch') or '0') + 1
redis.call('DEL', KEYS[1])
for i = 2, #ARGV do
  redis.call('HSET', KEYS[1], 'shard-' .. (i - 2), ARGV[i])
end
redis.call('HSET', KEYS[2], 'shard_count', #ARGV - 1, 'epoch', epoch)
return epoch
"""

_ASSIGN = """
local count = tonumber(redis.call('HGET', KEYS[2], 'shard_count') or '-1')
if count < 0 then return redis.error_reply('NOMAP no shard map') end
for i = 1, #ARGV, 2 do
  local index = tonumber(ARGV[i])
  if index == nil or index < 0 or index >= count then
    return redis.error_reply('RANGE shard index ' .. ARGV[i] .. ' outside 0..' .. (count - 1))
  end
  redis.call('HSET', KEYS[1], 'shard-' .. ARGV[i], ARGV[i + 1])
end
return redis.call('HINCRBY', KEYS[2], 'epoch', 1)
"""


@dataclass(frozen=True)
class ShardMap:
    """One consistent snapshot: ``queues[i]`` owns ``shard-i``."""

    shard_count: int
    epoch: int
    queues: tuple[str, ...]

    @classmethod
    def balanced(cls, queues: Sequence[str], shard_count: int, epoch: int = 0) -> ShardMap:
        """Shard i goes to ``queues[i % len(queues)]``: every queue within one shard of even."""
        if not queues:
            raise ShardMapError("a shard map needs at least one GPU queue")
        if len(set(queues)) != len(queues):
            raise ShardMapError(f"GPU queues must be distinct, got {list(queues)}")
        if shard_count < len(queues):
            raise ShardMapError(
                f"{shard_count} shards cannot cover {len(queues)} GPU queues; use more shards"
            )
        return cls(shard_count, epoch, tuple(queues[i % len(queues)] for i in range(shard_count)))

    def as_dict(self) -> dict[str, Any]:
        """The ``shards show --json`` form."""
        return {
            "shard_count": self.shard_count,
            "epoch": self.epoch,
            "shards": {f"shard-{i}": q for i, q in enumerate(self.queues)},
        }

    def shards_per_queue(self) -> dict[str, int]:
        return dict(Counter(self.queues))


class ShardMapStore:
    """Reads and changes the shard map in Redis. Writers accept a pipeline to compose."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._init = client.register_script(_INIT)
        self._assign = client.register_script(_ASSIGN)

    def create(self, shard_map: ShardMap, *, force: bool = False) -> int:
        """Store ``shard_map`` (ignoring its epoch); refuses an existing map unless ``force``.

        Returns the new epoch: one more than any map stored before.
        """
        try:
            epoch = self._init(
                keys=[MAP_KEY, META_KEY], args=["1" if force else "0", *shard_map.queues]
            )
        except redis.ResponseError as exc:
            if "EXISTS" in str(exc):
                raise ShardMapError(
                    "a shard map already exists; `gpu-tasks shards show` prints it, and "
                    "`shards init --force` replaces it (entities on moved shards lose their state)"
                ) from None
            raise
        return int(epoch)

    def assign(
        self, moves: Mapping[int, str], pipeline: redis.client.Pipeline | None = None
    ) -> Any:
        """Give each shard index in ``moves`` to its new queue and bump the epoch, atomically."""
        args: list[str | int] = []
        for index, queue in moves.items():
            args += [index, queue]
        try:
            return self._assign(keys=[MAP_KEY, META_KEY], args=args, client=pipeline)
        except redis.ResponseError as exc:
            raise ShardMapError(f"cannot move shards: {exc}") from None

    def shard_count(self) -> int:
        """S of the stored map; :class:`ShardMapError` if there is none."""
        raw = self.client.hget(META_KEY, "shard_count")
        if raw is None:
            raise ShardMapError(NO_MAP)
        return int(raw)

    def epoch(self) -> int | None:
        raw = self.client.hget(META_KEY, "epoch")
        return None if raw is None else int(raw)

    def load(self) -> ShardMap:
        """Read the map and its epoch in one transaction; :class:`ShardMapError` if absent."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hgetall(META_KEY)
        pipe.hgetall(MAP_KEY)
        meta, shards = pipe.execute()
        if not meta:
            raise ShardMapError(NO_MAP)
        count = int(meta[b"shard_count"])
        queues = []
        for i in range(count):
            queue = shards.get(f"shard-{i}".encode())
            if queue is None:
                raise ShardMapError(f"shard map is malformed: shard-{i} has no GPU queue")
            queues.append(queue.decode())
        return ShardMap(count, int(meta[b"epoch"]), tuple(queues))

    def exists(self) -> bool:
        return bool(self.client.exists(META_KEY))


class ShardMapCache:
    """A producer's copy of the shard map, refreshed when its epoch changes.

    :meth:`get` costs one clock read while the copy is fresh; once per
    ``refresh_s`` it reads the epoch from Redis (and the whole map if the epoch
    moved). If Redis cannot be reached, the last copy keeps serving: the broker
    publish that follows reports the outage.
    """

    def __init__(self, redis_url: str | None, refresh_s: float = 1.0) -> None:
        self.redis_url = redis_url
        self.refresh_s = refresh_s
        self._store: ShardMapStore | None = None
        self._map: ShardMap | None = None
        self._next_check = 0.0
        self._lock = threading.Lock()

    def get(self) -> ShardMap:
        cached = self._map
        if cached is not None and time.monotonic() < self._next_check:
            return cached
        with self._lock:
            return self._refresh()

    def _refresh(self) -> ShardMap:
        now = time.monotonic()
        cached = self._map
        if cached is not None and now < self._next_check:
            return cached  # another thread refreshed while we waited
        if self._store is None:
            if not self.redis_url:
                raise ConfigError(
                    "no Redis configured: set GPU_TASKS_REDIS_URL (or pass --redis-url) "
                    "so routed tasks can find the shard map"
                )
            self._store = ShardMapStore(redis.Redis.from_url(self.redis_url))
        try:
            if cached is None or self._store.epoch() != cached.epoch:
                cached = self._map = self._store.load()
        except redis.RedisError as exc:
            if cached is None:
                raise ShardMapError(f"cannot read the shard map from Redis: {exc}") from exc
            log.warning("shard map refresh failed (%s); routing with epoch %d", exc, cached.epoch)
        self._next_check = now + self.refresh_s
        return cached
