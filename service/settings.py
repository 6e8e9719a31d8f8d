"""The service's configuration file (``service.yaml``): one place for every setting of a replica.

Production runs the same service with a dozen settings (database, broker, TLS, Globus Auth,
retention); on a command line they drift between replicas and leak secrets into ``ps``. The
file is YAML, validated like the endpoint's ``config.yaml`` (file, key, problem, close matches),
and every key has a command-line flag of the same meaning that overrides it, so an operator can
try one change without editing the file. Precedence: flag > file > environment
(``TETHER_DB_URL``, ``TETHER_HOME``, ``TETHER_LOG_FORMAT``) > built-in default.

Secrets never sit in a file others can read: the Globus client secret comes from a file of
its own (mode 0600), and a config file whose ``db_url`` or ``broker_url`` holds a password must
itself be 0600. Relative paths in the file are relative to the file's directory, so a config
works wherever the service is started from.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tether.configfile import load_yaml, validate
from tether.errors import ConfigError
from tether.home import tether_home

_PATH = {"type": "string", "minLength": 1}

#: The schema of service.yaml; docs/deploy.md has the reference table (keep the two in step).
SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "host": {"type": "string", "minLength": 1},
        "port": {"type": "integer", "minimum": 0, "maximum": 65535},
        "home": _PATH,
        "db_url": {"type": "string", "pattern": "^(sqlite|postgresql)(\\+[a-z0-9]+)?://"},
        "auto_migrate": {"type": "boolean"},
        "db_threads": {"type": "integer", "minimum": 1, "maximum": 256},
        "broker_url": {"type": "string", "pattern": "^amqps?://"},
        "replica_id": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"},
        "advertise_url": {"type": "string", "pattern": "^https?://[^/?#]+$", "maxLength": 2048},
        "max_payload_bytes": {"type": "integer", "minimum": 1024},
        "prefetch": {"type": "integer", "minimum": 0, "maximum": 100000},
        "max_open_tasks_per_user": {"type": "integer", "minimum": 1},
        "result_retention_s": {"type": "number", "minimum": 0},
        "uncollected_retention_s": {"type": "number", "minimum": 0},
        "purge_interval_s": {"type": "number", "exclusiveMinimum": 0},
        # large payloads (docs/payloads.md)
        "blob_dir": _PATH,
        "blob_threshold_bytes": {"type": "integer", "minimum": 1024},
        "max_blob_bytes": {"type": "integer", "minimum": 1},
        "blob_quota_bytes": {"type": "integer", "minimum": 1},
        "function_quota_bytes": {"type": "integer", "minimum": 1},
        "function_retention_s": {"type": "number", "minimum": 0},
        "blob_orphan_s": {"type": "number", "exclusiveMinimum": 0},
        # connections (docs/security.md, "Limits")
        "max_connections": {"type": "integer", "minimum": 16},
        "max_connections_per_address": {"type": "integer", "minimum": 0},
        "header_timeout_s": {"type": "number", "exclusiveMinimum": 0},
        "send_timeout_s": {"type": "number", "exclusiveMinimum": 0},
        "max_queued_bytes_per_connection": {"type": "integer", "minimum": 65536},
        "log_level": {"enum": ["debug", "info", "warning", "error", "critical"]},
        "log_format": {"enum": ["text", "json"]},
        "allow_insecure_http": {"type": "boolean"},
        "tls": {
            "type": "object",
            "additionalProperties": False,
            "required": ["cert", "key"],
            "properties": {"cert": _PATH, "key": _PATH, "ca": _PATH},
        },
        "globus": {
            "type": "object",
            "additionalProperties": False,
            "required": ["client_id", "client_secret_file"],
            "properties": {
                "client_id": {"type": "string", "minLength": 1},
                "client_secret_file": _PATH,
                "scope": {"type": "string", "minLength": 1},
                "auth_url": {"type": "string", "pattern": "^https?://"},
            },
        },
    },
}

#: keys whose values are file paths (relative ones are taken from the config file's directory)
_PATH_KEYS = ("home", "blob_dir", "tls.cert", "tls.key", "tls.ca", "globus.client_secret_file")


@dataclass
class ServiceConfig:
    """Everything a service replica is started with; ``None`` means "not set here"."""

    host: str = "127.0.0.1"
    port: int = 8421
    home: str | None = None
    db_url: str | None = None
    #: PostgreSQL: upgrade an outdated schema at start instead of refusing to start (SQLite always does)
    auto_migrate: bool = False
    #: threads, and so database connections, per replica for PostgreSQL (None: the service's default)
    db_threads: int | None = None
    #: RabbitMQ between replicas (amqp://user:password@host/vhost); None: one process, in-process fan-out
    broker_url: str | None = None
    #: this replica's name in logs and on the broker; unique per replica (default: random)
    replica_id: str | None = None
    #: with a broker: the URL at which clients reach this replica itself (not the balancer); told to
    #: clients with the endpoints this replica holds, so their tasks come here directly (None: never)
    advertise_url: str | None = None
    max_payload_bytes: int | None = None
    prefetch: int | None = None
    max_open_tasks_per_user: int | None = None
    #: bytes of function bodies one user may keep; how long one no stored task names is kept
    function_quota_bytes: int | None = None
    function_retention_s: float | None = None
    result_retention_s: float | None = None
    uncollected_retention_s: float | None = None
    purge_interval_s: float | None = None
    #: large payloads: where blob files live (replicas must share it), what goes as a blob, the limits
    blob_dir: str | None = None
    blob_threshold_bytes: int | None = None
    max_blob_bytes: int | None = None
    blob_quota_bytes: int | None = None
    blob_orphan_s: float | None = None
    #: connections: caps in all and per address, how long headers may take, how far a peer may lag
    max_connections: int | None = None
    max_connections_per_address: int | None = None
    header_timeout_s: float | None = None
    send_timeout_s: float | None = None
    max_queued_bytes_per_connection: int | None = None
    log_level: str = "warning"
    log_format: str | None = None
    allow_insecure_http: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    globus_client_id: str | None = None
    globus_client_secret_file: str | None = None
    globus_scope: str | None = None
    globus_auth_url: str | None = None
    #: the file these settings came from, for messages (None: flags and defaults only)
    source: str | None = field(default=None, compare=False)

    def resolved_home(self) -> Path:
        """TETHER_HOME of this service: ``home`` from the file, else the environment's."""
        return Path(self.home).expanduser().absolute() if self.home else tether_home()

    def resolved_db_url(self) -> str:
        """The store's URL: ``db_url``, else ``TETHER_DB_URL``, else SQLite in the service's home."""
        return (self.db_url or os.environ.get("TETHER_DB_URL")
                or f"sqlite:///{self.resolved_home() / 'service' / 'tether.db'}")

    def how_to_upgrade(self) -> str:
        """The command an operator types to migrate this service's database."""
        if self.source:
            return f"tether service db upgrade --config {self.source}"
        return f"tether service db upgrade --db-url {redact(self.resolved_db_url())}"


def redact(url: str) -> str:
    """A database or broker URL fit for a log line or a message: the password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def _flatten(data: dict[str, Any]) -> dict[str, Any]:
    """``{"tls": {"cert": x}}`` -> ``{"tls_cert": x}``: the file's sections are the flags' prefixes."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("tls", "globus"):
            for sub, inner in value.items():
                out[f"{key}_{sub}"] = inner
        else:
            out[key] = value
    return out


def _check_private(path: Path, data: dict[str, Any]) -> None:
    """A config file holding a password (in a URL) must be readable by its owner only."""
    with_password = [k for k in ("db_url", "broker_url") if isinstance(data.get(k), str)
                     and urlsplit(data[k]).password]
    if not with_password:
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"{path}: {', '.join(with_password)} holds a password, but the file is readable by others "
                          f"(mode {mode:04o}): chmod 600 {path}, or give the password elsewhere (a .pgpass file, a "
                          f"URL without a password)")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The settings in a service.yaml, validated, as flat ``ServiceConfig`` field values."""
    path = Path(path).expanduser().absolute()
    data = load_yaml(path) or {}
    validate(data, str(path), SCHEMA, "service configuration")
    _check_private(path, data)
    flat = _flatten(data)
    for dotted in _PATH_KEYS:
        key = dotted.replace(".", "_")
        if key in flat:
            flat[key] = str((path.parent / Path(flat[key]).expanduser()).absolute())
    return flat


def service_config(config_file: str | Path | None = None, **overrides: Any) -> ServiceConfig:
    """The settings of a service: the file's, then every override that is not None (the flags)."""
    values: dict[str, Any] = {}
    source = None
    if config_file:
        source = str(Path(config_file).expanduser().absolute())
        values.update(load_config_file(source))
    known = {f.name for f in fields(ServiceConfig)}
    for key, value in overrides.items():
        if key not in known:
            raise TypeError(f"unknown service setting {key!r}")
        if value is not None:
            values[key] = value
    return ServiceConfig(**values, source=source)
