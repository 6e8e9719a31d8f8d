"""Where Tether keeps its files: ``TETHER_HOME`` (default ``~/.tether``), so tests and several
users on one machine never collide, and how a secret is written there (0600, replaced whole)."""

from __future__ import annotations

import os
from pathlib import Path


def tether_home() -> Path:
    return Path(os.environ.get("TETHER_HOME") or Path.home() / ".tether").expanduser().absolute()


def service_file() -> Path:
    return tether_home() / "service.json"


def write_secret(path: Path, text: str) -> None:
    """Write a secret file that only its owner can read (created 0600, never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


__all__ = ["service_file", "tether_home", "write_secret"]
