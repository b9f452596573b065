"""Reading ``GPU_TASKS_REDIS_URL`` (gpu_tasks.redisurl): every form, what Celery
and kombu get from it, and that no password is ever shown. No Redis needed."""

from __future__ import annotations

import ssl
from typing import Any

import pytest
from kombu import Connection

from gpu_tasks.app import celery_config
from gpu_tasks.errors import ConfigError
from gpu_tasks.protocol.routing import EntityRouter
from gpu_tasks.redisurl import parse, redacted_url
from gpu_tasks.settings import Settings

SENTINELS = ("sentinel://u:s3cret@10.0.0.1:26379/2;sentinel://10.0.0.2/2;"
             "sentinel://10.0.0.3:26380/2?master_name=gpus&sentinel_password=t0ps3cret")


def conf_of(settings: Settings) -> dict[str, Any]:
    return celery_config(settings, EntityRouter(lambda: 1024, settings.max_entity_id_chars))


@pytest.mark.parametrize("url, shown", [
    ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
    ("redis://user:s3cret@h/1", "redis://user:***@h/1"),
    ("redis://s3cret@h", "redis://***@h"),  # a userinfo without ':' may be a password
    ("redis://user:p@ss/w:rd@h/0", "redis://user:***@h/0"),  # unencoded '@' and '/'
    ("rediss://:s3cret@h/0?ssl_ca_certs=/etc/ca.pem", "rediss://:***@h/0?ssl_ca_certs=/etc/ca.pem"),
    (SENTINELS, "sentinel://u:***@10.0.0.1:26379/2;sentinel://10.0.0.2/2;"
                "sentinel://10.0.0.3:26380/2?master_name=gpus&sentinel_password=***"),
    ("sentinel://:a1@h1;sentinel://:a1@h2?master_name=m",
     "sentinel://:***@h1;sentinel://:***@h2?master_name=m"),
    ("redis://h:6379/0", "redis://h:6379/0"),
    ("not a url", "not a url"),
])
def test_every_password_is_hidden(url: str, shown: str) -> None:
    assert redacted_url(url) == shown


def test_a_sentinel_url_gives_every_sentinel_the_master_name_and_both_logins() -> None:
    target = parse(SENTINELS)
    assert target.sentinel and target.master_name == "gpus" and target.db == 2
    assert target.hosts == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("10.0.0.3", 26380))
    assert (target.username, target.password) == ("u", "s3cret")
    assert target.sentinel_kwargs(1.0) == {"socket_timeout": 1.0, "socket_connect_timeout": 1.0,
                                           "password": "t0ps3cret"}
    assert "s3cret" not in repr(target) and "t0ps3cret" not in repr(target)


def test_celery_and_kombu_get_one_sentinel_url_and_every_sentinel_in_the_options() -> None:
    conf = conf_of(Settings(redis_url=SENTINELS, redis_timeout_s=6.0))
    # kombu: one address (a ';' list would make it switch to its stock transport on
    # failover); the Sentinels and the master's name in the transport options
    assert conf["broker_url"] == "sentinel://u:s3cret@10.0.0.1:26379/2"
    assert conf["broker_transport"] == "gpu_tasks.connection.broker:SentinelProducerTransport"
    options = conf["broker_transport_options"]
    assert options["master_name"] == "gpus"
    assert options["sentinels"] == [["10.0.0.1", 26379], ["10.0.0.2", 26379],
                                    ["10.0.0.3", 26380]]
    # without the Sentinels' login: workers show their transport options (inspect stats)
    assert options["sentinel_kwargs"] == {"socket_timeout": 2.0, "socket_connect_timeout": 2.0}
    assert "t0ps3cret" not in repr(conf) and "t0ps3cret" not in repr(
        conf["result_backend_transport_options"])
    assert options["socket_timeout"] == 2.0 and options["priority_steps"] == [0]
    # Celery's result backend: its own ';' form, the same options
    assert conf["result_backend"] == ("sentinel://u:s3cret@10.0.0.1:26379/2;"
                                      "sentinel://10.0.0.2:26379/2;sentinel://10.0.0.3:26380/2")
    assert conf["result_backend_transport_options"]["master_name"] == "gpus"
    assert conf["broker_use_ssl"] is False and conf["redis_backend_use_ssl"] is None


@pytest.mark.parametrize("query, reqs, ca", [
    ("", ssl.CERT_REQUIRED, None),  # the default: check, by the system's CA store
    ("?ssl_ca_certs=/etc/gpu-tasks/ca.pem", ssl.CERT_REQUIRED, "/etc/gpu-tasks/ca.pem"),
    ("?ssl_cert_reqs=optional", ssl.CERT_OPTIONAL, None),
    ("?ssl_cert_reqs=CERT_NONE", ssl.CERT_NONE, None),
])
def test_tls_checks_the_certificate_unless_told_otherwise(query: str, reqs: ssl.VerifyMode,
                                                          ca: str | None) -> None:
    conf = conf_of(Settings(redis_url=f"rediss://:pw@redis.example:6380/1{query}"))
    expected = {"ssl_cert_reqs": reqs, **({"ssl_ca_certs": ca} if ca else {})}
    # The same for the broker, the result backend and gpu-tasks' own clients
    assert conf["broker_use_ssl"] == expected == conf["redis_backend_use_ssl"]
    client = Settings(redis_url=f"rediss://:pw@redis.example:6380/1{query}").redis_client()
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["ssl_cert_reqs"] == reqs and kwargs.get("ssl_ca_certs") == ca
    # And a kombu Connection made from the broker URL alone checks it the same way
    assert Connection(conf["broker_url"]).ssl["ssl_cert_reqs"] == reqs


@pytest.mark.parametrize("url, why", [
    ("http://h/0", "must start with redis://"),
    ("unix://:pw@/run/redis.sock", "Unix sockets are not supported"),
    ("sentinel://h1:26379", "master_name"),
    ("sentinel://:a@h1;sentinel://:b@h2?master_name=m", "different users or passwords"),
    ("sentinel://h1/1;sentinel://h2/2?master_name=m", "different databases"),
    ("redis://:pw@h/0?ssl_cert_reqs=none", "unknown parameter 'ssl_cert_reqs' for redis://"),
    ("rediss://:pw@h/0?ssl_cert_reqs=maybe", "required, optional or none"),
    ("rediss://:pw@h/0?ssl_certfile=/c.pem", "both ssl_certfile and ssl_keyfile"),
    ("redis://:pw@h/zero", "database must be a number"),
    ("redis://:pw@h:99999/0", "cannot be read"),
])
def test_a_url_that_cannot_be_honoured_is_refused_without_its_password(url: str,
                                                                      why: str) -> None:
    with pytest.raises(ConfigError, match=why) as raised:
        Settings(redis_url=url)
    assert "pw" not in str(raised.value).replace("GPU_TASKS", "") or ":***@" in str(
        raised.value)
    assert ":a@" not in str(raised.value) and ":pw@" not in str(raised.value)


def test_settings_never_show_the_url_with_its_password() -> None:
    settings = Settings(redis_url="redis://:s3cret@h/0")
    assert "s3cret" not in repr(settings)
    assert settings.redis_url_shown == "redis://:***@h/0"


def test_a_redis_out_of_memory_is_said_first_not_unavailable() -> None:
    import redis
    from kombu.exceptions import OperationalError

    from gpu_tasks.connection.broker import broker_unavailable

    # Given the error kombu raises when Redis refuses a publish at maxmemory
    try:
        try:
            raise redis.exceptions.OutOfMemoryError(
                "OOM command not allowed when used memory > 'maxmemory'.")
        except redis.RedisError as exc:
            raise OperationalError("publish failed") from exc
    except OperationalError as wrapped:
        error = broker_unavailable("cannot send gpu_tasks.alloc",
                                   "redis://:secret@127.0.0.1:7/0", wrapped)
    # Then the producer reads that Redis is out of memory, first, and why
    assert str(error).startswith("cannot send gpu_tasks.alloc: Redis at "
                                 "redis://:***@127.0.0.1:7/0 is out of memory")
    assert "OutOfMemoryError: OOM command not allowed" in str(error)
    assert "secret" not in str(error) and "unavailable" not in str(error)
