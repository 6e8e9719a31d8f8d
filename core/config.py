"""Where Tether keeps its state and how the client finds the service.

``TETHER_HOME`` (default ``~/.tether``) holds everything, so tests and several users on one
machine never collide. The service is found from an explicit argument, else the environment
(``TETHER_SERVICE_URL`` + ``TETHER_TOKEN``), else ``$TETHER_HOME/service.json``, which
``tether service start`` writes with mode 0600.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError


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


@dataclass(frozen=True)
class ServiceInfo:
    url: str
    token: str

    @property
    def ws_url(self) -> str:
        if self.url.startswith("https://"):
            return "wss://" + self.url[len("https://"):]
        if self.url.startswith("http://"):
            return "ws://" + self.url[len("http://"):]
        raise ConfigError(f"service URL {self.url!r} must start with http:// or https://")


def find_service(service: str | None = None, token: str | None = None) -> ServiceInfo:
    """Resolve the service URL and token, in the documented order."""
    url = service or os.environ.get("TETHER_SERVICE_URL")
    tok = token or os.environ.get("TETHER_TOKEN")
    if not (url and tok):
        path = service_file()
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{path}: cannot read service file ({exc}); restart 'tether service start'") from exc
            url = url or data.get("url")
            tok = tok or data.get("token")
    if not url:
        raise ConfigError(
            "no Tether service configured: pass Executor(service=URL), set TETHER_SERVICE_URL and "
            f"TETHER_TOKEN, or run 'tether service start' (which writes {service_file()})"
        )
    if not tok:
        raise ConfigError(f"no token for service {url}: set TETHER_TOKEN or pass token=...")
    return ServiceInfo(url.rstrip("/"), tok)
