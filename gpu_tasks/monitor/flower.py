"""Flower for a deployment: how ``gpu-tasks flower`` and ``gpu-tasks up`` start it.

Flower offers Shut Down, pool and consumer controls and a REST API that submits
tasks, so it runs with HTTP basic authentication unless told otherwise, and
without it only on a loopback address. The credentials reach Flower through its
environment (``FLOWER_BASIC_AUTH``), never its command line, which every user of
the host can read in ``ps``. Flower keeps its task history in ``<data_dir>/flower.db``
so a restart does not forget it, and loads :mod:`gpu_tasks.monitor.flowerconfig`, which
makes its REST API answer a refused request with a 4xx and the reason
(:mod:`gpu_tasks.monitor.flower_api`).

This module only builds command lines and files: it imports neither Flower nor
tornado, so the CLI and :class:`~gpu_tasks.local.cluster.LocalCluster` stay light.
"""

from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass
from pathlib import Path

from gpu_tasks.errors import ConfigError
from gpu_tasks.settings import Settings, env_name

DEFAULT_PORT = 5555
DEFAULT_ADDRESS = "127.0.0.1"
STATE_SAVE_INTERVAL_S = 60.0
"""How often Flower writes its task history to disk (it also does when it stops): a
crash loses at most this much."""
CREDENTIALS_FILE = "flower-credentials"
"""Under the data dir: the password ``gpu-tasks up`` made for its session (mode 0600)."""
SESSION_USER = "gpu-tasks"
CONF_FILE = Path(__file__).with_name("flowerconfig.py")
"""Flower's ``--conf`` file: tornado runs it inside Flower's process at start."""
AUTH_SETTING = env_name("flower_basic_auth")

# Flower reads these from its environment; we set them, so inherited ones must not
# change what we decided (an inherited FLOWER_UNAUTHENTICATED_API would open the API).
_FLOWER_AUTH_ENV = ("FLOWER_BASIC_AUTH", "FLOWER_UNAUTHENTICATED_API")


def parse_basic_auth(text: str) -> str:
    """Check ``USER:PASSWORD[,USER:PASSWORD...]`` and return it; the message never
    includes the text (it is a secret)."""
    pairs = text.split(",")
    for n, pair in enumerate(pairs, 1):
        user, colon, password = pair.partition(":")
        if not colon or not user or not password:
            raise ConfigError(
                f"Flower credentials must be USER:PASSWORD (several: comma-separated, so no "
                f"comma inside a password); entry {n} of {len(pairs)} is not"
            )
    return text


def is_loopback(address: str) -> bool:
    """Whether Flower bound to ``address`` is reachable from this host only."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # a host name or "" (every interface)


@dataclass(frozen=True)
class FlowerAuth:
    """How Flower authenticates: ``basic_auth`` (a secret) or none, and where an operator
    finds the credentials (safe to print)."""

    basic_auth: str | None
    shown: str

    @property
    def enabled(self) -> bool:
        return self.basic_auth is not None

    @property
    def user(self) -> str | None:
        return None if self.basic_auth is None else self.basic_auth.split(":", 1)[0]

    @property
    def password(self) -> str | None:
        if self.basic_auth is None:
            return None
        return self.basic_auth.split(",", 1)[0].split(":", 1)[1]


def resolve_auth(settings: Settings, basic_auth: str | None, no_auth: bool,
                 address: str) -> FlowerAuth:
    """The flag, else the setting; ``--no-auth`` only where nobody else can connect.

    Raises :class:`ConfigError` for both at once, no credentials at all, or ``--no-auth``
    on an address other hosts can reach."""
    if no_auth:
        if basic_auth:
            raise ConfigError("--basic-auth and --no-auth contradict each other")
        if not is_loopback(address):
            raise ConfigError(
                f"--no-auth is allowed only on a loopback address (127.0.0.1, ::1, "
                f"localhost), not {address or 'every interface'!r}: anyone who can reach "
                f"it could shut workers down and submit work"
            )
        return FlowerAuth(None, "none (--no-auth, loopback only)")
    if basic_auth:
        return FlowerAuth(parse_basic_auth(basic_auth), "the --basic-auth flag")
    if settings.flower_basic_auth:
        return FlowerAuth(parse_basic_auth(settings.flower_basic_auth), AUTH_SETTING)
    raise ConfigError(
        f"Flower needs credentials: set {AUTH_SETTING}=USER:PASSWORD (e.g. in "
        f"/etc/gpu-tasks/env) or pass --basic-auth USER:PASSWORD; --no-auth only on a "
        f"loopback address"
    )


def db_path(settings: Settings) -> Path:
    """Where Flower keeps its task history between restarts."""
    return Path(settings.data_dir).resolve() / "flower.db"


def flower_argv(settings: Settings, *, port: int, address: str,
                state_save_interval_s: float = STATE_SAVE_INTERVAL_S) -> list[str]:
    """``celery flower`` for this deployment (no secret in it)."""
    return [
        sys.executable, "-m", "celery", "--app=gpu_tasks.app", "flower",
        f"--address={address}",
        f"--port={port}",
        f"--conf={CONF_FILE}",
        "--persistent=True",
        f"--db={db_path(settings)}",
        f"--state_save_interval={int(state_save_interval_s * 1000)}",
    ]


def flower_env(settings: Settings, auth: FlowerAuth) -> dict[str, str]:
    """Flower's environment: the settings (for ``gpu_tasks.app``) and its authentication.

    With credentials, they protect the pages and the REST API alike. Without (loopback
    only), the REST API is switched on too (``FLOWER_UNAUTHENTICATED_API``), as the pages'
    own buttons call it."""
    env = {k: v for k, v in settings.child_env().items() if k not in _FLOWER_AUTH_ENV}
    if auth.basic_auth is not None:
        env["FLOWER_BASIC_AUTH"] = auth.basic_auth
    else:
        env["FLOWER_UNAUTHENTICATED_API"] = "true"
    return env
