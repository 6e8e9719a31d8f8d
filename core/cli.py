"""The ``tether`` command line: ``tether service ...`` and ``tether endpoint ...``.

Command bodies import the service/endpoint packages lazily, so the client-only install still
has a working ``tether`` that explains which extra to install.
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
from rich.console import Console
from rich.table import Table

from .errors import TetherError
from .home import service_file, tether_home, write_secret
from .ids import InvalidIdentifier, check_name
from .processes import SERVICE_COMMANDS, is_recorded_process, signal_and_wait

app = typer.Typer(help="Tether: federated function execution for research computing.", no_args_is_help=True,
                  add_completion=False)
service_app = typer.Typer(help="Run the relay service.", no_args_is_help=True)
endpoint_app = typer.Typer(help="Configure and run endpoints.", no_args_is_help=True)
db_app = typer.Typer(help="The store's schema: show its revision, apply migrations.", no_args_is_help=True)
service_app.add_typer(db_app, name="db")
app.add_typer(service_app, name="service")
app.add_typer(endpoint_app, name="endpoint")
console = Console()
err = Console(stderr=True)


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _need(extra: str, module: str) -> None:
    try:
        __import__(module)
    except ImportError as exc:
        _fail(f"this command needs the '{extra}' extra: pip install 'tether[{extra}]' ({exc})")


# --- service --------------------------------------------------------------------------------
ConfigOption = Annotated[Optional[Path], typer.Option(  # noqa: UP045 - typer reads the annotation at run time
    "--config", "-c", help="the service's config file (service.yaml; keys in docs/deploy.md); flags override it",
    show_default=False)]


def _service_config(config: Path | None, **overrides: Any) -> Any:
    """The settings a ``tether service`` command works with: ``--config``'s file, then the flags.

    The file's ``home`` becomes this command's TETHER_HOME, so ``stop``/``status`` find the
    service.json of the service that file configures."""
    if config is None and not overrides:
        return None
    _need("service", "tether.service.settings")
    from tether.service.settings import service_config

    try:
        cfg = service_config(config, **overrides)
    except TetherError as exc:
        _fail(str(exc))
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
    _need("service", "tether.service.server")
    paths = {"tls_cert": tls_cert, "tls_key": tls_key, "tls_ca": tls_ca,
             "globus_client_secret_file": globus_client_secret_file}
    flags: dict[str, Any] = {
        "host": host, "port": port, "home": str(Path(home).resolve()) if home else None, "db_url": db_url,
        "db_threads": db_threads,
        "auto_migrate": auto_migrate or None, "broker_url": broker_url,
        "replica_id": replica_id, "max_payload_bytes": max_payload_bytes, "prefetch": prefetch,
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
        _fail(f"a service is already running from {tether_home()} (pid {running}, {info.get('url')}); "
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
            _fail(f"the service exited with code {proc.returncode}; last lines of {log_path}:\n  {tail}")
        time.sleep(0.05)
    _fail(f"the service did not come up within 60s; see {log_path}")


def _service_info() -> dict[str, Any]:
    try:
        return json.loads(service_file().read_text())
    except (OSError, ValueError):
        return {}


def _healthy(url: str, ca_file: str | None = None) -> bool:
    import httpx

    from .urls import tls_context

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
        _fail(f"no service recorded in {service_file()}")
    pid = _service_pid(info)
    if pid is None:
        console.print(f"the service was not running (pid {recorded} in {service_file()} is gone or is "
                      f"another process now; left alone)")
        return
    if not signal_and_wait(pid, signal.SIGTERM, 10):
        _fail(f"the service (pid {pid}) did not exit within 10 s of SIGTERM")
    console.print(f"stopped the service (pid {pid})")


@service_app.command("status")
def service_status(config: ConfigOption = None) -> None:
    """Is the service of this TETHER_HOME (or the config's ``home``) up?"""
    _service_config(config)
    info = _service_info()
    if not info:
        _fail(f"no service recorded in {service_file()}; run 'tether service start'")
    state = "[green]up[/]" if _healthy(info["url"], info.get("ca_file")) else "[red]down[/]"
    pid = _service_pid(info)
    process = f"pid {pid}" if pid else "no service process of this TETHER_HOME runs here"
    console.print(f"{info['url']}: {state} ({process})")


DbUrlOption = Annotated[Optional[str], typer.Option(  # noqa: UP045 - typer reads the annotation at run time
    "--db-url", help="the store's SQLAlchemy URL (default: the config's db_url, TETHER_DB_URL, or SQLite in "
    "TETHER_HOME)", show_default=False)]


def _db_settings(config: Path | None, db_url: str | None) -> Any:
    """The service settings that say which database a command administers."""
    _need("service", "tether.service.settings")
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
    _need("service", "tether.service.store")
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
        _fail(str(exc))
    except OperationalError as exc:
        _fail(f"cannot use the database {redact(url)}: {str(exc.orig).strip()}")


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
        _fail(f"no user named {name!r}")
    console.print(f"revoked the token of {name}; open connections with it are closed within a second")


def _db_engine(config: Path | None, db_url: str | None) -> tuple[Any, Any]:
    """(settings, SQLAlchemy engine) of the configured database, for the schema commands."""
    _need("service", "tether.service.schema")
    from tether.service.store import make_engine

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


# --- endpoint -------------------------------------------------------------------------------
def _endpoint_name(name: str) -> str:
    """Checked as it enters: a name becomes a directory, so '..', 'a/b' or '/x' must never pass."""
    try:
        check_name(name)
    except InvalidIdentifier as exc:
        _fail(f"{exc}; it names a directory under {tether_home() / 'endpoints'}")
    return name


EndpointName = Annotated[str, typer.Argument(callback=_endpoint_name, help="the endpoint's name", show_default=False)]


def _endpoint_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    _need("endpoint", "tether.endpoint.manage")
    try:
        return fn(*args, **kwargs)
    except TetherError as exc:
        _fail(str(exc))


@endpoint_app.command("configure")
def endpoint_configure(
    name: EndpointName,
    engine: str = typer.Option("process", help="thread | process | htex | mpi (Parsl; see docs/endpoint-admin.md)"),
    workers: int = typer.Option(None, help="tasks that run at once (default: CPU count)"),
    force: bool = typer.Option(False, help="overwrite an existing config.yaml"),
    multi_user: bool = typer.Option(False, "--multi-user", help="an endpoint that runs each user's tasks as their "
                                    "own local account (start it as root; see docs/multi-user.md)"),
) -> None:
    """Create $TETHER_HOME/endpoints/NAME/config.yaml (and, with --multi-user, the identity
    mapping, the user config template and its schema)."""
    from tether.endpoint import manage

    path = _endpoint_call(manage.configure, name, engine, workers, force, multi_user)
    extra = ""
    if multi_user:
        extra = ("\nedit identity_mapping.json, user_config_template.yaml.j2 and user_config_schema.json beside it; "
                 f"preview with: tether endpoint render-user-config {name} --user NAME --config '{{}}'")
    console.print(f"configured endpoint [bold]{name}[/]: {path}{extra}\nstart it with: tether endpoint start {name}")


@endpoint_app.command("render-user-config")
def endpoint_render_user_config(
    name: EndpointName,
    user: str = typer.Option(..., help="the identity's user name (as the service knows it)"),
    config: str = typer.Option("{}", help="the user_endpoint_config, as JSON"),
) -> None:
    """Show the config.yaml a multi-user endpoint would give USER's endpoint for CONFIG."""
    from tether.endpoint import manage

    try:
        values = json.loads(config)
    except ValueError as exc:
        _fail(f"--config is not valid JSON: {exc}")
    if not isinstance(values, dict):
        _fail("--config must be a JSON object, e.g. '{\"workers\": 2}'")
    print(_endpoint_call(manage.render_user_config, name, user, values), end="")


@endpoint_app.command("start")
def endpoint_start(
    name: EndpointName, detach: bool = typer.Option(False, "--detach", "-d", help="run in the background")
) -> None:
    """Register (once) and run the endpoint; prints its endpoint id."""
    from tether.endpoint import manage

    running = _endpoint_call(manage.daemon_pid, name)
    if running:
        _fail(f"endpoint {name!r} is already running (pid {running}); 'tether endpoint stop {name}' stops it, "
              f"'tether endpoint restart {name}' restarts it in the background")
    cred = _endpoint_call(manage.ensure_registered, name)
    _endpoint_call(manage.apply_policy, name, cred)
    if detach:
        status = _endpoint_call(manage.start_detached, name)
        console.print(f"endpoint [bold]{name}[/] started (pid {status['pid']})")
        print(cred["endpoint_id"])
        return
    print(cred["endpoint_id"], flush=True)
    from tether.endpoint.run import run_daemon

    raise typer.Exit(_endpoint_call(run_daemon, name))


@endpoint_app.command("stop")
def endpoint_stop(name: EndpointName) -> None:
    """Stop a running endpoint (its unfinished tasks run again at the next start)."""
    from tether.endpoint import manage

    if _endpoint_call(manage.stop, name):
        console.print(f"stopped endpoint {name}")
    else:
        console.print(f"endpoint {name} was not running")


@endpoint_app.command("restart")
def endpoint_restart(name: EndpointName) -> None:
    """Stop, then start in the background."""
    from tether.endpoint import manage

    _endpoint_call(manage.stop, name)
    cred = _endpoint_call(manage.ensure_registered, name)
    _endpoint_call(manage.apply_policy, name, cred)
    status = _endpoint_call(manage.start_detached, name)
    console.print(f"endpoint [bold]{name}[/] restarted (pid {status['pid']})")
    print(cred["endpoint_id"])


@endpoint_app.command("list")
def endpoint_list(as_json: bool = typer.Option(False, "--json", help="print as JSON")) -> None:
    """Endpoints configured in this TETHER_HOME."""
    from tether.endpoint import manage

    rows = _endpoint_call(manage.list_endpoints)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("name", "endpoint id", "engine", "state", "pid")
    for r in rows:
        color = "green" if r["state"] == "connected" else "yellow" if r["pid"] else "dim"
        table.add_row(r["name"], r["endpoint_id"] or "(not registered)", str(r["engine"]),
                      f"[{color}]{r['state']}[/]", str(r["pid"] or ""))
    console.print(table)


@endpoint_app.command("status")
def endpoint_status(name: Annotated[str, typer.Argument(help="the endpoint's name, or its id", show_default=False)],
                    as_json: bool = typer.Option(False, "--json", help="print as JSON")) -> None:
    """Daemon state, capacity and versions, locally and as the service sees it."""
    from tether.endpoint import manage

    info = _endpoint_call(manage.status, name)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    svc = info.get("service") or {}
    cap = (svc.get("status") or {}).get("capacity") or info["local"].get("capacity") or {}
    ver = (svc.get("status") or {}).get("versions") or info["local"].get("versions") or {}
    table = Table(show_header=False)
    table.add_row("endpoint", f"{info.get('name') or name} ({info.get('endpoint_id', 'not registered')})")
    if info["running"] is None:
        table.add_row("daemon", "not configured in this TETHER_HOME")
    else:
        table.add_row("daemon", f"running, pid {info['pid']}" if info["running"] else "stopped")
    if "service" in info:
        table.add_row("service", "[green]online[/]" if svc.get("online") else "[red]offline[/]")
    elif "service_error" in info:
        table.add_row("service", f"[red]unreachable[/]: {info['service_error']}")
    for key in ("engine", "workers_total", "workers_idle", "tasks_queued", "tasks_running"):
        if key in cap:
            table.add_row(key.replace("_", " "), str(cap[key]))
    if info["local"]:
        table.add_row("results spooled", str(info["local"].get("spooled", 0)))
    if ver:
        table.add_row("versions", ", ".join(f"{k} {v}" for k, v in ver.items() if k != "platform"))
    console.print(table)


@endpoint_app.command("delete")
def endpoint_delete(name: EndpointName, yes: bool = typer.Option(False, "--yes", "-y", help="do not ask")) -> None:
    """Stop the endpoint, delete it from the service and remove its local state."""
    from tether.endpoint import manage

    if not yes and not typer.confirm(f"delete endpoint {name} and its local state?"):
        raise typer.Exit(1)
    _endpoint_call(manage.delete, name)
    console.print(f"deleted endpoint {name}")


@endpoint_app.command("rotate-credential")
def endpoint_rotate_credential(name: str) -> None:
    """Replace the endpoint's credential with a new one: the old one stops working at once and a
    running endpoint reconnects with the new one."""
    from tether.endpoint import manage

    cred = _endpoint_call(manage.rotate_credential, name)
    console.print(f"endpoint [bold]{name}[/] ({cred['endpoint_id']}) has a new credential; the old one is void")


# --- identity ----------------------------------------------------------------------------
@app.command("login")
def login_command(
    service: str = typer.Option(..., help="the service URL"),
    globus_client_id: str = typer.Option(..., help="the Globus native app's client id (from the service's admin)"),
    scope: str = typer.Option(..., help="the service's Globus scope"),
    globus_auth_url: str = typer.Option(None, help="Globus Auth's base URL (default: production Globus Auth)"),
) -> None:
    """Log in with Globus Auth (native-app flow) for a service that accepts Globus tokens."""
    from .login import login

    def ask(url: str) -> str:
        console.print(f"Open this URL, log in, and paste the authorization code here:\n\n  {url}\n", highlight=False)
        return typer.prompt("Authorization code")

    try:
        data = login(service, globus_client_id, scope, ask, globus_auth_url)
    except TetherError as exc:
        _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - globus-sdk's errors: say what Globus said
        _fail(f"Globus Auth refused the login: {exc}")
    console.print(f"logged in to {service} (token valid for {int(data['expires_at_seconds'] - time.time())} s, "
                  "refreshed automatically)")


@app.command("logout")
def logout_command(service: str = typer.Option(..., help="the service URL")) -> None:
    """Revoke and forget your Globus tokens for a service."""
    from .login import logout

    if not logout(service):
        _fail(f"not logged in to {service}")
    console.print(f"logged out of {service}")


@app.command("dashboard")
def dashboard_command(
    service: str = typer.Option(None, help="the service URL (default: as the client finds it)"),
    open_browser: bool = typer.Option(False, "--open", help="open it in the default browser"),
) -> None:
    """Print a link to the service's dashboard that signs you in (your token rides in the URL's
    fragment, which the browser never sends to any server; treat the link as the token)."""
    from .config import find_service

    info = find_service(service, None)
    link = f"{info.url}/dashboard#token={info.token}"
    print(link)
    if open_browser:
        import webbrowser

        webbrowser.open(link)


@app.command("whoami")
def whoami_command(service: str = typer.Option(None, help="the service URL (default: as the client finds it)"),
                   as_json: bool = typer.Option(False, "--json", help="print as JSON")) -> None:
    """Who the service thinks you are."""
    from .client import Client

    with Client(service) as client:
        me = client.whoami()
    if as_json:
        print(json.dumps(me))
    else:
        console.print(f"{me['name']} ({me['user_id']}) at {client.info.url}", highlight=False)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        console.print(f"tether {__version__} (Python {sys.version.split()[0]})", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """Tether: federated function execution for research computing."""


def _no_flag_placeholders() -> None:
    """typer >= 0.20 shows a ``<bool>`` type beside every flag in --help, where nothing is to be
    typed; flags show none (other options keep their ``<int>``, ``<str>`` hints)."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


def main() -> None:
    with contextlib.suppress(ImportError, AttributeError):
        _no_flag_placeholders()
    try:
        app()
    except TetherError as exc:  # raised outside a command's own handling (the client's errors)
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
