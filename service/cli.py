"""``tether service ...``: start, stop and look at the relay service; users and tokens; the
store's schema. Mounted by the ``tether`` command (``core/cli.py``); command bodies import the
service's own modules lazily, so ``tether --help`` stays quick and a client-only install says
which extra a command needs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from tether.console import console, fail, need
from tether.errors import TetherError
from tether.home import service_file, tether_home, write_secret
from tether.processes import SERVICE_COMMANDS, is_recorded_process, signal_and_wait

service_app = typer.Typer(help="Run the relay service.", no_args_is_help=True)
db_app = typer.Typer(help="The store's schema: show its revision, apply migrations.", no_args_is_help=True)
service_app.add_typer(db_app, name="db")


ConfigOption = Annotated[Optional[Path], typer.Option(  # noqa: UP045 - typer reads the annotation at run time
    "--config", "-c", help="the service's config file (service.yaml; keys in docs/deploy.md); flags override it",
    show_default=False)]


def _service_config(config: Path | None, **overrides: Any) -> Any:
    """The settings a ``tether service`` command works with: ``--config``'s file, then the flags.

    The file's ``home`` becomes this command's TETHER_HOME, so ``stop``/``status`` find the
    service.json of the service that file configures."""
    if config is None and not overrides:
        return None
    need("service", "tether.service.settings")
    from tether.service.settings import service_config

    try:
        cfg = service_config(config, **overrides)
    except TetherError as exc:
        fail(str(exc))
    if cfg.home:
        os.environ["TETHER_HOME"] = str(cfg.resolved_home())
    return cfg


@service_app.command("start")
def service_start(
    config: ConfigOption = None,
    port: int = typer.Option(None, help="port to listen on (0: any free port; default 8421)", show_default=False),
    host: str = typer.Option(None, help="address to bind (default 127.0.0.1)", show_default=False),
    detach: bool = typer.Option(False, "--detach", "-d", help="run in the background"),
    home: str = typer.Option(None, help="the service's state directory (service.json, the default SQLite "
                             "database); default TETHER_HOME"),
    db_url: str = typer.Option(None, help="SQLAlchemy URL of the store (default: SQLite in TETHER_HOME)"),
    db_threads: int = typer.Option(None, help="threads (database connections) per replica for PostgreSQL"),
    auto_migrate: bool = typer.Option(None, "--auto-migrate", help="PostgreSQL: upgrade an outdated schema at "
                                      "start instead of refusing to start", show_default=False),
    broker_url: str = typer.Option(None, help="RabbitMQ between replicas: amqp://user:password@host/vhost"),
    replica_id: str = typer.Option(None, help="this replica's name in logs and on the broker (default: random)"),
    advertise_url: str = typer.Option(None, help="with a broker: the URL at which clients reach this replica itself "
                                      "(https://host:port); clients then send an endpoint's tasks to its replica"),
    max_payload_bytes: int = typer.Option(None, help="largest task argument/result accepted"),
    prefetch: int = typer.Option(None, help="tasks an endpoint is sent beyond its workers (flow control)"),
    max_open_tasks_per_user: int = typer.Option(None, help="tasks a user may have waiting or running at once "
                                                "(default 2,000,000); more are refused in words"),
    result_retention: float = typer.Option(None, help="seconds collected results are kept"),
    uncollected_retention: float = typer.Option(None, help="seconds after which results nobody collected expire"),
    purge_interval: float = typer.Option(None, help="seconds between deletions of expired results and blobs"),
    blob_threshold_bytes: int = typer.Option(None, help="payloads above this travel as blobs (default 8 MiB)"),
    max_blob_bytes: int = typer.Option(None, help="largest blob (large argument/result) accepted (default 16 GiB)"),
    blob_quota_bytes: int = typer.Option(None, help="bytes of blobs one user may store at once (default 100 GiB)"),
    blob_orphan_seconds: float = typer.Option(None, help="blobs no task names are deleted after this (default 3600)"),
    function_quota_bytes: int = typer.Option(None, help="bytes of function bodies one user may keep (default 1 GiB)"),
    function_retention: float = typer.Option(None, help="seconds a function body no stored task names is kept after "
                                             "it was last sent (default 30 days)"),
    blob_dir: str = typer.Option(None, help="where blob files live (default $TETHER_HOME/service/blobs); replicas "
                                 "of one service must share it"),
    max_connections: int = typer.Option(None, help="connections held at once, in all (default 2048)"),
    max_connections_per_address: int = typer.Option(None, help="connections held at once from one address "
                                                    "(default 256; 0: no cap, as behind a balancer)"),
    header_timeout: float = typer.Option(None, help="seconds a connection may take to send a request's headers "
                                         "(default 10)"),
    send_timeout: float = typer.Option(None, help="seconds a peer may take to accept one frame before it is "
                                       "dropped (default 30)"),
    max_queued_bytes_per_connection: int = typer.Option(None, help="bytes that may wait for a slow reader before "
                                                        "it is dropped (default 64 MiB)"),
    log_level: str = typer.Option(None, help="debug | info | warning | error (default warning)", show_default=False),
    log_format: str = typer.Option(None, help="text | json (default text, or TETHER_LOG_FORMAT)", show_default=False),
    tls_cert: str = typer.Option(None, help="PEM certificate: serve https/wss only"),
    tls_key: str = typer.Option(None, help="PEM private key of --tls-cert"),
    tls_ca: str = typer.Option(None, help="CA bundle that signed --tls-cert, recorded in service.json for local "
                               "clients (a private CA or a self-signed certificate)"),
    allow_insecure_http: bool = typer.Option(None, "--allow-insecure-http", show_default=False,
                                             help="listen beyond loopback without TLS (trusted networks only)"),
    globus_client_id: str = typer.Option(None, help="accept Globus Auth tokens: this service's Globus client id"),
    globus_client_secret_file: str = typer.Option(None, help="file (mode 0600) holding that client's secret"),
    globus_scope: str = typer.Option(None, help="the scope Globus tokens must carry"),
    globus_auth_url: str = typer.Option(None, help="Globus Auth's base URL (default: production Globus Auth)"),
) -> None:
    """Start the service and write $TETHER_HOME/service.json. With no options: the embedded
    default (SQLite, one process, localhost); production: --config service.yaml."""
    need("service", "tether.service.server")
    paths = {"tls_cert": tls_cert, "tls_key": tls_key, "tls_ca": tls_ca,
             "globus_client_secret_file": globus_client_secret_file}
    flags: dict[str, Any] = {
        "host": host, "port": port, "home": str(Path(home).resolve()) if home else None, "db_url": db_url,
        "db_threads": db_threads,
        "auto_migrate": auto_migrate or None, "broker_url": broker_url,
        "replica_id": replica_id, "advertise_url": advertise_url, "max_payload_bytes": max_payload_bytes,
        "prefetch": prefetch,
        "max_open_tasks_per_user": max_open_tasks_per_user,
        "result_retention_s": result_retention, "uncollected_retention_s": uncollected_retention,
        "purge_interval_s": purge_interval, "blob_threshold_bytes": blob_threshold_bytes,
        "max_blob_bytes": max_blob_bytes, "blob_quota_bytes": blob_quota_bytes, "blob_orphan_s": blob_orphan_seconds,
        "function_quota_bytes": function_quota_bytes, "function_retention_s": function_retention,
        "blob_dir": str(Path(blob_dir).resolve()) if blob_dir else None,
        "max_connections": max_connections, "max_connections_per_address": max_connections_per_address,
        "header_timeout_s": header_timeout, "send_timeout_s": send_timeout,
        "max_queued_bytes_per_connection": max_queued_bytes_per_connection,
        "log_level": log_level, "log_format": log_format, "allow_insecure_http": allow_insecure_http or None,
        "globus_client_id": globus_client_id, "globus_scope": globus_scope, "globus_auth_url": globus_auth_url,
        **{key: str(Path(value).resolve()) if value else None for key, value in paths.items()},
    }
    _service_config(config, **flags)  # a mistake in the file or a flag is reported here, before anything starts
    info = _service_info()
    running = _service_pid(info) if info else None
    if running is not None:
        fail(f"a service is already running from {tether_home()} (pid {running}, {info.get('url')}); "
              "'tether service stop' stops it (or set TETHER_HOME to run another)")
    args: list[str] = ["--config", str(config.resolve())] if config else []
    names = {"result_retention_s": "--result-retention", "uncollected_retention_s": "--uncollected-retention",
             "purge_interval_s": "--purge-interval", "blob_orphan_s": "--blob-orphan-seconds",
             "header_timeout_s": "--header-timeout", "send_timeout_s": "--send-timeout",
             "function_retention_s": "--function-retention"}
    for key, value in flags.items():
        flag = names.get(key, "--" + key.replace("_", "-"))
        if value is True:
            args.append(flag)
        elif value is not None and value is not False:
            args += [flag, str(value)]
    if not detach:
        from tether.service.server import main as server_main

        server_main(args)
        return
    home = tether_home()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path = home / "service.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tether.service.server", *args], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        info = _service_info()
        if info.get("pid") == proc.pid and _answers(info["url"]):
            console.print(f"Tether service running at [bold]{info['url']}[/] (pid {proc.pid}); "
                          f"credentials in {service_file()}")
            return
        if proc.poll() is not None:
            tail = "\n  ".join(log_path.read_text(errors="replace").splitlines()[-10:])
            fail(f"the service exited with code {proc.returncode}; last lines of {log_path}:\n  {tail}")
        time.sleep(0.05)
    fail(f"the service did not come up within 60s; see {log_path}")


def _service_info() -> dict[str, Any]:
    try:
        return json.loads(service_file().read_text())
    except (OSError, ValueError):
        return {}


def _healthy(url: str, ca_file: str | None = None) -> bool:
    import httpx

    from tether.urls import tls_context

    verify = tls_context(url, ca_file) or True
    try:
        return httpx.get(url + "/healthz", timeout=1, trust_env=False, verify=verify).status_code == 200
    except httpx.HTTPError:
        return False


def _answers(url: str) -> bool:
    """Whether the service we just started answers /healthz on this host.

    Its certificate is not checked here: it names the service's public host name, not the
    loopback address we probe, and its CA may be one only the clients hold (tls.ca is optional).
    The probe carries no credential, and the process is ours (service.json names its pid).
    Clients and endpoints always verify."""
    import ssl

    import httpx

    verify: ssl.SSLContext | bool = True
    if url.startswith("https://"):
        verify = ssl.create_default_context()
        verify.check_hostname = False
        verify.verify_mode = ssl.CERT_NONE
    try:
        return httpx.get(url + "/healthz", timeout=1, trust_env=False, verify=verify).status_code == 200
    except httpx.HTTPError:
        return False


def _service_pid(info: dict[str, Any]) -> int | None:
    """The pid in service.json if that process still is the service; else None, and the stale pid
    is dropped from service.json (url and token stay: a restarted service keeps its token).

    The pid may have been reused by any process since the service died: it is only believed if
    that process runs the service and started before service.json was written."""
    pid = info.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool):
        return None
    path = service_file()
    try:
        written = path.stat().st_mtime
    except OSError:
        return None
    if is_recorded_process(pid, SERVICE_COMMANDS, written):
        return pid
    if _service_info() == info:  # not rewritten meanwhile by a service starting now
        write_secret(path, json.dumps({k: v for k, v in info.items() if k != "pid"}))
    return None


@service_app.command("stop")
def service_stop(config: ConfigOption = None) -> None:
    """Stop the service started from this TETHER_HOME (or the config's ``home``)."""
    _service_config(config)
    info = _service_info()
    recorded = info.get("pid")
    if not recorded:
        fail(f"no service recorded in {service_file()}")
    pid = _service_pid(info)
    if pid is None:
        console.print(f"the service was not running (pid {recorded} in {service_file()} is gone or is "
                      f"another process now; left alone)")
        return
    if not signal_and_wait(pid, signal.SIGTERM, 10):
        fail(f"the service (pid {pid}) did not exit within 10 s of SIGTERM")
    console.print(f"stopped the service (pid {pid})")


@service_app.command("status")
def service_status(config: ConfigOption = None) -> None:
    """Is the service of this TETHER_HOME (or the config's ``home``) up?"""
    _service_config(config)
    info = _service_info()
    if not info:
        fail(f"no service recorded in {service_file()}; run 'tether service start'")
    state = "[green]up[/]" if _healthy(info["url"], info.get("ca_file")) else "[red]down[/]"
    pid = _service_pid(info)
    process = f"pid {pid}" if pid else "no service process of this TETHER_HOME runs here"
    console.print(f"{info['url']}: {state} ({process})")


DbUrlOption = Annotated[Optional[str], typer.Option(  # noqa: UP045 - typer reads the annotation at run time
    "--db-url", help="the store's SQLAlchemy URL (default: the config's db_url, TETHER_DB_URL, or SQLite in "
    "TETHER_HOME)", show_default=False)]


def _db_settings(config: Path | None, db_url: str | None) -> Any:
    """The service settings that say which database a command administers."""
    need("service", "tether.service.settings")
    from tether.service.settings import ServiceConfig

    return _service_config(config, db_url=db_url) or ServiceConfig()


def _make_sqlite_dir(url: str) -> None:
    """SQLite makes its file, not the directory it goes in (the embedded default's is private)."""
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    if url.startswith("sqlite") and database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True, mode=0o700)


def _store(config: Path | None, db_url: str | None) -> Any:
    """The store of the configured service (``--config``, ``--db-url``, else this TETHER_HOME's),
    for user administration. An outdated PostgreSQL schema is refused with the command to run."""
    need("service", "tether.service.store")
    from tether.service.store import Store

    cfg = _db_settings(config, db_url)
    _make_sqlite_dir(cfg.resolved_db_url())
    with _database_errors(cfg.resolved_db_url()):
        return Store(cfg.resolved_db_url(), upgrade_hint=cfg.how_to_upgrade())


@contextlib.contextmanager
def _database_errors(url: str) -> Iterator[None]:
    """A refused schema or an unreachable database as one line naming it, not a traceback."""
    from sqlalchemy.exc import OperationalError

    from tether.service.settings import redact

    try:
        yield
    except TetherError as exc:
        fail(str(exc))
    except OperationalError as exc:
        fail(f"cannot use the database {redact(url)}: {str(exc.orig).strip()}")


@service_app.command("user-add")
def service_user_add(
    name: str,
    config: ConfigOption = None,
    db_url: DbUrlOption = None,
    as_json: bool = typer.Option(False, "--json", help="print {user_id, name, token} as JSON"),
) -> None:
    """Create a user, or rotate an existing user's token, and print the token once.

    A rotated token replaces the old one at once: a running service refuses the old token
    within a second, connections made with it included.
    """
    user_id, token = _store(config, db_url).create_user(name)
    if as_json:
        print(json.dumps({"user_id": user_id, "name": name, "token": token}))
    else:
        console.print(f"user {name} ({user_id})\ntoken: {token}", highlight=False)


@service_app.command("token-revoke")
def service_token_revoke(name: str, config: ConfigOption = None, db_url: DbUrlOption = None) -> None:
    """Revoke a user's token (until 'user-add NAME' issues a new one); effective at once."""
    if not _store(config, db_url).revoke_user_token(name):
        fail(f"no user named {name!r}")
    console.print(f"revoked the token of {name}; open connections with it are closed within a second")


def _db_engine(config: Path | None, db_url: str | None) -> tuple[Any, Any]:
    """(settings, SQLAlchemy engine) of the configured database, for the schema commands."""
    need("service", "tether.service.schema")
    from tether.service.database import make_engine

    cfg = _db_settings(config, db_url)
    _make_sqlite_dir(cfg.resolved_db_url())
    return cfg, make_engine(cfg.resolved_db_url())


@db_app.command("upgrade")
def service_db_upgrade(config: ConfigOption = None, db_url: DbUrlOption = None) -> None:
    """Upgrade the store's schema to this tether's newest revision (safe while other replicas
    start: one migrates, the others wait). Run it before starting upgraded replicas."""
    from tether.service.schema import upgrade

    cfg, engine = _db_engine(config, db_url)
    try:
        with _database_errors(cfg.resolved_db_url()):
            before, after = upgrade(engine)
    finally:
        engine.dispose()
    from tether.service.settings import redact

    where = redact(cfg.resolved_db_url())
    if before.current == after.current:
        print(f"{where}: already at revision {after.current}")
    else:
        print(f"{where}: upgraded from revision {before.current or '(none)'} to {after.current}")


@db_app.command("current")
def service_db_current(config: ConfigOption = None, db_url: DbUrlOption = None,
                       as_json: bool = typer.Option(False, "--json", help="print {current, head, state} as JSON")
                       ) -> None:
    """Show the store's schema revision and whether this tether would need to upgrade it."""
    from tether.service.schema import schema_status
    from tether.service.settings import redact

    cfg, engine = _db_engine(config, db_url)
    try:
        with _database_errors(cfg.resolved_db_url()):
            status = schema_status(engine)
    finally:
        engine.dispose()
    if as_json:
        print(json.dumps({"current": status.current, "head": status.head, "state": status.state}))
    else:
        print(f"{redact(cfg.resolved_db_url())}: {status.describe()}")


__all__ = ["service_app"]
