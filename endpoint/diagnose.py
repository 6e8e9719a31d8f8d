"""``tether endpoint diagnose``: one file a support team can read, with no secret in it.

What is asked for first when an endpoint misbehaves: its configuration, what its daemon says
about itself, the end of its logs, the versions of everything that runs tasks, and whether the
service can be reached from here. The bundle (a ``.tar.gz``) holds all of it, with secrets
removed: the credential file is left out, and any value under a key that names a secret
(``secret``, ``token``, ``password``, ...) or any string that is the credential itself is
replaced by ``<redacted>`` wherever it appears, logs included.
"""

from __future__ import annotations

import io
import json
import os
import platform
import re
import socket
import sys
import tarfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tether.errors import ConfigError

from .config import endpoint_dir
from .credential import FILE as CREDENTIAL_FILE
from .manage import daemon_pid

#: keys whose values never go into a bundle
SECRET_KEY = re.compile(r"secret|token|passw|credential|api[_-]?key|private", re.IGNORECASE)
#: the end of each log file that goes in (a flooded log must not make a bundle of gigabytes)
LOG_TAIL_BYTES = 1024 * 1024
#: what the versions section lists, beside Python and the platform
PACKAGES = ("tether", "parsl", "dask", "distributed", "snakemake", "globus-sdk", "msgspec", "httpx", "websockets",
            "sqlalchemy", "cloudpickle", "pyyaml", "jinja2", "uvicorn", "fastapi")
REDACTED = "<redacted>"


def bundle(name: str, output: Path | None = None) -> Path:
    """Write the diagnostic bundle of endpoint ``name`` and return its path (default:
    ``./tether-diagnose-NAME-<time>.tar.gz``)."""
    directory = endpoint_dir(name)
    if not (directory / "config.yaml").exists():
        raise ConfigError(f"no endpoint named {name!r} under {directory.parent}; 'tether endpoint list' shows those "
                          "configured here")
    secrets = _secrets(directory)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = output or Path.cwd() / f"tether-diagnose-{name}-{stamp}.tar.gz"
    files: dict[str, str] = {
        "summary.json": json.dumps(_summary(name, directory), indent=2, default=str),
        "versions.json": json.dumps(versions(), indent=2),
        "connectivity.json": json.dumps(connectivity(directory), indent=2),
    }
    for child in sorted(directory.iterdir()):
        if child.name == CREDENTIAL_FILE or not child.is_file():
            continue
        if child.suffix in (".yaml", ".yml", ".j2", ".json") and child.stat().st_size <= LOG_TAIL_BYTES:
            files[f"config/{child.name}"] = _redact_text(child.read_text(errors="replace"), secrets)
        elif child.suffix == ".log" or ".log." in child.name:
            files[f"logs/{child.name}"] = _redact_text(_tail(child), secrets)
    for log in sorted((directory / "user_endpoints").glob("*.log*")):  # a multi-user endpoint's user endpoints
        files[f"logs/user_endpoints/{log.name}"] = _redact_text(_tail(log), secrets)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for member, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"tether-diagnose-{name}/{member}")
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o600
            tar.addfile(info, io.BytesIO(data))
    os.chmod(path, 0o600)
    return path


def connectivity_summary(path: Path) -> str:
    """The connectivity section of a bundle (what ``tether endpoint diagnose`` prints)."""
    with tarfile.open(path, "r:gz") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/connectivity.json"))
        handle = tar.extractfile(member)
        assert handle is not None
        return handle.read().decode()


def versions() -> dict[str, Any]:
    """Python, the platform and the installed versions of what runs tasks."""
    found: dict[str, str] = {}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return {"python": sys.version, "executable": sys.executable, "platform": platform.platform(),
            "packages": found}


def connectivity(directory: Path) -> dict[str, Any]:
    """Whether the service this endpoint is registered with answers from here: name lookup,
    TCP connect, then its health document over HTTP(S)."""
    try:
        url = json.loads((directory / CREDENTIAL_FILE).read_text())["service_url"]
    except (OSError, ValueError, KeyError):
        return {"ok": False, "error": "the endpoint is not registered yet (no credential.json): run "
                                      "'tether endpoint start' once"}
    parts = urlsplit(url)
    host, port = parts.hostname or "localhost", parts.port or (443 if parts.scheme in ("https", "wss") else 80)
    checks: dict[str, Any] = {"service_url": url}
    try:
        checks["resolves_to"] = sorted({a[4][0] for a in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})
        started = time.monotonic()
        with socket.create_connection((host, port), timeout=5):
            checks["tcp_connect_ms"] = round(1000 * (time.monotonic() - started), 1)
        import httpx

        scheme = "https" if parts.scheme in ("https", "wss") else "http"
        answer = httpx.get(f"{scheme}://{parts.netloc}/healthz", timeout=10, trust_env=False)
        checks["http_status"] = answer.status_code
        checks["service_health"] = answer.json() if answer.status_code == 200 else answer.text[:500]
        checks["ok"] = answer.status_code == 200
    except Exception as exc:  # noqa: BLE001 - the failure is the finding
        checks["ok"] = False
        checks["error"] = f"{type(exc).__name__}: {exc}"
    return checks


def _summary(name: str, directory: Path) -> dict[str, Any]:
    pid = daemon_pid(name)
    summary: dict[str, Any] = {"endpoint": name, "directory": str(directory), "daemon_pid": pid,
                               "running": pid is not None, "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                      time.gmtime())}
    try:
        summary["endpoint_id"] = json.loads((directory / CREDENTIAL_FILE).read_text())["endpoint_id"]
    except (OSError, ValueError, KeyError):
        summary["endpoint_id"] = None
    usage = os.statvfs(directory)
    summary["disk_free_bytes"] = usage.f_bavail * usage.f_frsize
    return summary


def _secrets(directory: Path) -> list[str]:
    """The credential's secret values: removed wherever they appear."""
    try:
        fields = json.loads((directory / CREDENTIAL_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [str(v) for k, v in fields.items() if SECRET_KEY.search(k) and v and len(str(v)) >= 8]


def _redact_text(text: str, secrets: list[str]) -> str:
    """Values of secret-named keys (YAML ``key: value``, JSON ``"key": "value"``, ``KEY=value``)
    and the credential's secrets, wherever they are, become ``<redacted>``."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    pattern = re.compile(r'(?P<key>"?[\w.-]*(?:secret|token|passw|credential|api[_-]?key|private)[\w.-]*"?'
                         r'\s*[:=]\s*)(?P<value>"[^"\n]*"|\'[^\'\n]*\'|[^\s,}\n]+)', re.IGNORECASE)
    return pattern.sub(lambda m: m.group("key") + (f'"{REDACTED}"' if m.group("value").startswith('"')
                                                   else REDACTED), text)


def _tail(path: Path) -> str:
    with open(path, "rb") as fh:
        fh.seek(max(0, fh.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
        return fh.read().decode(errors="replace")


__all__ = ["bundle", "connectivity", "connectivity_summary", "versions"]
