"""How to reach the deployment's Redis, from its URL (``GPU_TASKS_REDIS_URL``).

One URL says everything: where Redis is (one server, or the Sentinels that know which
server is the master now), how to log in, and how to check the server's certificate.
This module reads it in one place, refuses what it cannot honour with a
:class:`~gpu_tasks.errors.ConfigError` that never shows a password, and gives each
consumer its part: gpu-tasks' own redis-py clients (:meth:`RedisTarget.client`), kombu's
broker transport and Celery's result backend (:meth:`RedisTarget.celery_options`), and
what output may show (:func:`redacted_url`).

Forms (the Celery/kombu ones, with everything a deployment needs in the URL itself)::

    redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]
    rediss://[[USER]:PASSWORD@]HOST[:PORT][/DB][?ssl_cert_reqs=required|optional|none]
            [&ssl_ca_certs=PATH][&ssl_certfile=PATH&ssl_keyfile=PATH]
    sentinel://[[USER]:PASSWORD@]HOST[:PORT][/DB];sentinel://HOST2[:PORT2];...
            ?master_name=NAME[&sentinel_username=USER][&sentinel_password=PASSWORD]

- ``rediss://`` checks the server's certificate against the system's CA store, and its
  host name, unless told otherwise (``ssl_cert_reqs``, ``ssl_ca_certs``): kombu would
  otherwise connect without checking anything (with a warning) and Celery's result
  backend would refuse to start. ``ssl_certfile``/``ssl_keyfile``: a client certificate,
  for servers with ``tls-auth-clients yes``.
- ``sentinel://``: every Sentinel, separated by ``;`` (port 26379 by default);
  ``master_name`` is the name the Sentinels monitor. The user and password are those of
  the Redis servers (master and replicas), written once (or identically on every
  address); Sentinels that require a password of their own (``requirepass`` in
  sentinel.conf) take ``sentinel_password``. TLS through Sentinel is not supported.
- ``unix://`` (a Unix socket) is refused: kombu's broker transport cannot use one (it
  would fail, or connect to localhost:6379 instead).
- Percent-encode reserved characters in a user or password (``@`` is ``%40``, ``:`` is
  ``%3A``, ``/`` is ``%2F``).
"""

from __future__ import annotations

import functools
import re
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import redis
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

from gpu_tasks.errors import ConfigError

SCHEMES = ("redis", "rediss", "sentinel")
DEFAULT_PORTS = {"redis": 6379, "rediss": 6379, "sentinel": 26379}
CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL,
             "none": ssl.CERT_NONE}
TLS_PARAMS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
SENTINEL_PARAMS = ("master_name", "sentinel_username", "sentinel_password")
_PARAMS = {"redis": (), "rediss": TLS_PARAMS, "sentinel": SENTINEL_PARAMS}


@dataclass(frozen=True)
class Tls:
    """How a ``rediss://`` client checks the server (and, with a certificate, proves who it
    is)."""

    cert_reqs: ssl.VerifyMode = ssl.CERT_REQUIRED
    """``required`` (the default) checks the certificate chain and the host name."""
    ca_certs: str | None = None
    """CA bundle (PEM) to check the server's certificate by; None: the system's store."""
    certfile: str | None = None
    keyfile: str | None = None

    def query(self) -> dict[str, str]:
        """As the URL's query parameters (``ssl_cert_reqs=required``, paths)."""
        reqs = next(k for k, v in CERT_REQS.items() if v == self.cert_reqs)
        return {"ssl_cert_reqs": reqs, **{k: str(v) for k, v in self.options().items()
                                          if k != "ssl_cert_reqs"}}

    def options(self) -> dict[str, Any]:
        """As redis-py, kombu (``broker_use_ssl``) and Celery (``redis_backend_use_ssl``)
        all take them."""
        options: dict[str, Any] = {"ssl_cert_reqs": self.cert_reqs}
        for key, value in (("ssl_ca_certs", self.ca_certs), ("ssl_certfile", self.certfile),
                           ("ssl_keyfile", self.keyfile)):
            if value:
                options[key] = value
        return options


@dataclass(frozen=True)
class RedisTarget:
    """A parsed ``GPU_TASKS_REDIS_URL``: one server, or the Sentinels of a master."""

    scheme: str
    hosts: tuple[tuple[str, int], ...]
    """The server (one), or every Sentinel."""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    master_name: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    tls: Tls | None = None
    shown: str = ""
    """The URL as output may show it (:func:`redacted_url`)."""

    @property
    def sentinel(self) -> bool:
        return self.scheme == "sentinel"

    # -- gpu-tasks' own clients -------------------------------------------------------

    def client(self, timeout_s: float, **options: Any) -> redis.Redis:
        """A redis-py client of the (current) master, with ``timeout_s`` as its connect and
        socket timeout, and any other redis-py ``options``. Through Sentinel, each new
        connection asks the Sentinels where the master is, so a client made before a
        failover reaches the new master after it."""
        kwargs: dict[str, Any] = {"db": self.db, "username": self.username,
                                  "password": self.password, "socket_timeout": timeout_s,
                                  "socket_connect_timeout": timeout_s, **one_attempt(),
                                  **options}
        if self.sentinel:
            if not self.master_name:  # parse() refuses such a URL; redis-py 8.2 wants a str
                raise ValueError("a sentinel:// URL needs the monitored master's name")
            manager = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
                list(self.hosts), sentinel_kwargs={**self.sentinel_kwargs(timeout_s),
                                                   **one_attempt()}, **kwargs)
            # untyped before redis-py 8.2
            master: redis.Redis = manager.master_for(  # type: ignore[no-untyped-call]
                self.master_name)
            return master
        if self.tls is not None:
            kwargs.update(ssl=True, **self.tls.options())
        host, port = self.hosts[0]
        return redis.Redis(host=host, port=port, **kwargs)

    def sentinel_kwargs(self, timeout_s: float) -> dict[str, Any]:
        """How to talk to the Sentinels themselves: the timeouts, and their own login."""
        return {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
                **self.sentinel_login()}

    def sentinel_login(self) -> dict[str, Any]:
        """The Sentinels' own ``username`` and ``password``, where they need one."""
        login: dict[str, Any] = {}
        if self.sentinel_username:
            login["username"] = self.sentinel_username
        if self.sentinel_password:
            login["password"] = self.sentinel_password
        return login

    # -- Celery and kombu -------------------------------------------------------------

    @property
    def broker_url(self) -> str:
        """The URL kombu's broker connection gets: one address only. Given several
        (``;``), kombu fails over by switching its connection to the next URL, and the
        switch replaces the transport with the stock one of the URL's scheme (losing the
        producer's and the GPU worker's own); the Sentinels travel in the transport
        options instead (``sentinels``, see :mod:`gpu_tasks.connection.broker`)."""
        return self._url(self.hosts[0])

    @property
    def backend_url(self) -> str:
        """The URL Celery's result backend gets: every Sentinel, ``;``-separated (Celery's
        own form), or the one server."""
        if not self.sentinel:
            return self.broker_url
        return ";".join(self._url(address, login=i == 0) for i, address in
                        enumerate(self.hosts))

    def _url(self, address: tuple[str, int], login: bool = True) -> str:
        userinfo = ""
        if login and (self.username or self.password):
            userinfo = quote(self.username or "", safe="")
            if self.password:
                userinfo += ":" + quote(self.password, safe="")
            userinfo += "@"
        host, port = address
        host = f"[{host}]" if ":" in host else host
        url = f"{self.scheme}://{userinfo}{host}:{port}/{self.db}"
        if self.tls is not None:
            # Also in the URL (besides broker_use_ssl): a kombu Connection made from the URL
            # alone (Celery makes one to mask it in `inspect conf`) would otherwise warn
            # that it "defaults to insecure SSL behaviour".
            url += "?" + urlencode(self.tls.query(), quote_via=quote)
        return url

    def transport_options(self, timeout_s: float) -> dict[str, Any]:
        """Broker and result-backend transport options this URL needs (Sentinel's), without
        the Sentinels' login: every worker shows its transport options, unmasked, in
        ``inspect stats`` (Flower's worker page), so the channels and the backend add the
        login themselves (:func:`sentinel_login`)."""
        if not self.sentinel:
            return {}
        return {"master_name": self.master_name,
                "sentinels": [list(address) for address in self.hosts],
                "sentinel_kwargs": {"socket_timeout": timeout_s,
                                    "socket_connect_timeout": timeout_s}}

    def ssl_options(self) -> dict[str, Any] | None:
        """``broker_use_ssl`` and ``redis_backend_use_ssl``: None without TLS."""
        return None if self.tls is None else self.tls.options()


def one_attempt() -> dict[str, Any]:
    """redis-py keyword arguments for one attempt per call, bounded by the socket timeouts.
    A client built with ``redis.Redis(...)`` retries a failed connection three times with
    backoff (seconds, past any timeout) where one from a URL does not; and a Sentinel that
    is down must cost one refused connection, not four, before the next one is asked."""
    return {"retry": Retry(NoBackoff(), 0)}


def sentinel_login(url: str | None) -> dict[str, Any]:
    """The Sentinels' own login from the deployment's URL (``sentinel_username``,
    ``sentinel_password``), to add to ``sentinel_kwargs`` where a Sentinel is asked."""
    if not url:
        return {}
    target = parse(url)
    return target.sentinel_login() if target.sentinel else {}


def parse(url: str) -> RedisTarget:
    """Read a Redis URL (the forms of the module docstring); a :class:`ConfigError` says
    what is wrong with it, showing it without its passwords."""
    return _parse(url)


@functools.lru_cache(maxsize=16)
def _parse(url: str) -> RedisTarget:
    shown = redacted_url(url)

    def refuse(why: str) -> ConfigError:
        return ConfigError(f"GPU_TASKS_REDIS_URL {shown}: {why}")

    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme == "unix":
        raise refuse("Unix sockets are not supported (kombu's broker transport cannot use "
                      "one): use redis://127.0.0.1:6379/0")
    if scheme not in SCHEMES:
        raise refuse("must start with redis://, rediss:// (TLS) or sentinel://")
    chunks = [c for c in url.split(";") if c.strip()] if scheme == "sentinel" else [url]
    hosts: list[tuple[str, int]] = []
    logins: set[tuple[str | None, str | None]] = set()
    dbs: set[int] = set()
    params: dict[str, str] = {}
    for chunk in chunks:
        try:
            parts = urlsplit(chunk.strip())
            port = parts.port
        except ValueError as exc:
            raise refuse(f"cannot be read ({exc})") from None
        if parts.scheme.lower() != scheme:
            raise refuse(f"every address must be a {scheme}:// URL")
        if parts.fragment:
            raise refuse("has a '#' fragment; percent-encode '#' in a password as %23")
        if parts.username is not None or parts.password is not None:
            logins.add((unquote(parts.username) if parts.username else None,
                        unquote(parts.password) if parts.password is not None else None))
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key not in _PARAMS[scheme]:
                allowed = ", ".join(_PARAMS[scheme]) or "none"
                raise refuse(f"unknown parameter {key!r} for {scheme}:// (allowed: "
                             f"{allowed})")
            if params.setdefault(key, value) != value:
                raise refuse(f"parameter {key!r} is given twice, differently")
        if not parts.hostname:
            raise refuse("has no host")
        hosts.append((parts.hostname, port or DEFAULT_PORTS[scheme]))
        db_text = parts.path.strip("/")
        if db_text:
            dbs.add(_db(db_text, refuse))
    if len(logins) > 1:
        raise refuse("gives different users or passwords on different addresses; write "
                     "them once, on the first")
    if len(dbs) > 1:
        raise refuse("names different databases on different addresses")
    username, password = next(iter(logins)) if logins else (None, None)
    target = RedisTarget(
        scheme=scheme, hosts=tuple(hosts), db=next(iter(dbs)) if dbs else 0,
        username=username or None, password=password, shown=shown,
        master_name=params.get("master_name") or None,
        sentinel_username=params.get("sentinel_username") or None,
        sentinel_password=params.get("sentinel_password") or None,
        tls=_tls(params, refuse) if scheme == "rediss" else None)
    if target.sentinel and not target.master_name:
        raise refuse("a sentinel:// URL needs the monitored master's name: "
                     "...?master_name=NAME")
    return target


def _db(text: str, refuse: Any) -> int:
    try:
        db = int(text)
    except ValueError:
        raise refuse(f"the database must be a number, not {text!r}") from None
    if db < 0:
        raise refuse(f"the database must not be negative, not {db}")
    return db


def _tls(params: dict[str, str], refuse: Any) -> Tls:
    reqs_text = params.get("ssl_cert_reqs", "required").lower().removeprefix("cert_")
    if reqs_text not in CERT_REQS:
        raise refuse(f"ssl_cert_reqs must be required, optional or none, not {reqs_text!r}")
    if bool(params.get("ssl_certfile")) != bool(params.get("ssl_keyfile")):
        raise refuse("a client certificate needs both ssl_certfile and ssl_keyfile")
    return Tls(cert_reqs=CERT_REQS[reqs_text], ca_certs=params.get("ssl_ca_certs") or None,
               certfile=params.get("ssl_certfile") or None,
               keyfile=params.get("ssl_keyfile") or None)


# A password in the userinfo (user:PASSWORD@, up to the address's last '@', so that an
# unencoded '@' or '/' in a password hides more rather than less), and any query parameter
# whose name says it is one (sentinel_password=...). The URL may be malformed (this runs
# on what the user typed, to show it in the error that says so): text work, not parsing.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^;]*)@")
_SECRET_PARAM = re.compile(r"(?P<key>[?&;][^=&;#]*pass[^=&;#]*=)[^&;#]*", re.IGNORECASE)


def redacted_url(url: str) -> str:
    """``url`` with every password replaced by ``***``: each address's (``user:***@``,
    or ``***@`` for a userinfo without a colon, which some clients read as the password)
    and each ``...password=`` query parameter; for messages, logs and status."""

    def hide_userinfo(match: re.Match[str]) -> str:
        user, colon, _password = match["userinfo"].partition(":")
        if not colon:
            user, shown = "", "***" if match["userinfo"] else ""
        else:
            shown = f"{user}:***"
        return f"{match['scheme']}{shown}@"

    return _SECRET_PARAM.sub(lambda m: f"{m['key']}***", _USERINFO.sub(hide_userinfo, url))
