"""Files of a local deployment that only this user may read: the data directory (0700:
Flower's history, the AOF and the logs hold requests' arguments and results), the embedded
Redis's password and URL, and Flower's credentials for one ``up`` session. Each is created
0600, so there is no moment when another user could read it, and an older one is
truncated and tightened the same way."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from gpu_tasks.monitor.flower import CREDENTIALS_FILE, SESSION_USER, FlowerAuth

REDIS_PASSWORD_FILE = "redis-password"
"""The embedded Redis's password, made on the first run and kept beside its data."""
REDIS_URL_FILE = "redis-url"
"""The embedded Redis's URL with that password, for a user's other shells."""


def private_dir(path: Path) -> Path:
    """``path`` created if need be, and readable by this user only (0700)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` to ``path``, readable by this user only, whatever its mode was."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)
    return path


def secret(path: Path) -> str:
    """The password kept in ``path``, made (and kept) if there is none yet: the same
    across runs on the same data directory."""
    if path.exists():
        kept = path.read_text().strip()
        if kept:
            return kept
    password = secrets.token_urlsafe(24)
    write_private(path, password + "\n")
    return password


def session_auth(data_dir: str | Path) -> tuple[FlowerAuth, Path]:
    """A random Flower password for one ``gpu-tasks up`` session, written (``user:password``)
    to ``<data_dir>/flower-credentials``; returns it and the file."""
    path = Path(data_dir).resolve() / CREDENTIALS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    basic_auth = f"{SESSION_USER}:{secrets.token_urlsafe(18)}"
    write_private(path, f"{basic_auth}\n")
    return FlowerAuth(basic_auth, str(path)), path
