"""What a Redis error means, read in one place for everyone who reports one.

A Redis error seldom says it all at its top: kombu wraps redis-py's errors, redis-py's
retries chain one attempt's error to the next, and the socket or TLS error that says why
sits some links down. :func:`describe` walks the chain once and says what happened: the
login was refused, a command was refused to this user (its ACL), Redis is out of memory,
it did not answer in time, or it could not be reached; and whether TLS could not verify
the server. The producers' ``BrokerUnavailable`` (:mod:`gpu_tasks.connection.broker`) and
the CLI's one-line errors word it for their readers; :func:`check_login` is the check that Flower
and the exporter make before they serve.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Literal

import redis

Kind = Literal["login", "permission", "memory", "timeout", "unreachable"]


def causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what caused it (``__cause__``, else ``__context__``), each once:
    redis-py's retries make cycles."""
    chain: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    return chain


@dataclass(frozen=True)
class RedisFailure:
    """What a Redis error says, read from every link of its chain."""

    kind: Kind
    """``login`` refused, a command refused to this user (``permission``), a write refused
    at ``maxmemory`` (``memory``), no answer in time (``timeout``), or not reached at all
    (``unreachable``), in that precedence."""
    cause: BaseException
    """The link that says most: the first Redis or socket error (kombu's wrappers and
    retry internals say less), else the error itself."""
    unverified: bool
    """TLS could not verify the server (its certificate, or the CA it was checked with)."""

    def what(self, shown: str, timeout_s: float) -> str:
        """What Redis at ``shown`` (a URL without its password) did, as one phrase."""
        if self.kind == "login":
            return (f"Redis at {shown} refused the login (the user or password in "
                    "GPU_TASKS_REDIS_URL)")
        if self.kind == "permission":
            return (f"Redis at {shown} refused a command to this user (its ACL; "
                    "ops/redis-users.acl has what gpu-tasks needs)")
        if self.kind == "memory":
            return (f"Redis at {shown} is out of memory: it refuses writes at its maxmemory "
                    "until memory is freed (results expire, queues drain) or maxmemory is "
                    "raised")
        if self.kind == "timeout":
            return (f"Redis at {shown} did not answer within {timeout_s:g} s "
                    "(GPU_TASKS_REDIS_TIMEOUT_S)")
        return f"Redis at {shown} is unavailable"


def describe(exc: BaseException) -> RedisFailure:
    """What ``exc`` (a Redis error, or one that a Redis error caused) means."""
    chain = causes(exc)
    kind: Kind
    if any(isinstance(e, redis.AuthenticationError) for e in chain):
        kind = "login"
    elif any(isinstance(e, redis.exceptions.NoPermissionError) for e in chain):
        kind = "permission"
    elif any(isinstance(e, redis.exceptions.OutOfMemoryError)
             or str(e).startswith("OOM command not allowed") for e in chain):
        kind = "memory"
    elif any(isinstance(e, (TimeoutError, redis.TimeoutError)) or "timed out" in str(e)
             for e in chain):
        kind = "timeout"
    else:
        kind = "unreachable"
    cause = next((e for e in chain if isinstance(e, (redis.RedisError, OSError))), exc)
    unverified = any(isinstance(e, ssl.SSLError) or "CERTIFICATE_VERIFY_FAILED" in str(e)
                     for e in chain)
    return RedisFailure(kind, cause, unverified)


def check_login(client: redis.Redis) -> None:
    """Raise the Redis error where Redis refuses the login or TLS cannot verify it: a
    service (Flower, the exporter) would otherwise start and fail every page or scrape
    until someone fixes the configuration. Redis merely down is no reason to: such a
    service says so, and recovers when Redis is back."""
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        failure = describe(exc)
        if failure.kind == "login" or failure.unverified:
            raise
    finally:
        client.close()
