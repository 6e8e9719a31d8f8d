"""Run the service: bind, make sure the local identity exists, write service.json, serve.

``python -m tether.service.server [--config service.yaml] [flags]`` is what ``tether service
start --detach`` launches; its settings are :class:`tether.service.settings.ServiceConfig`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
from pathlib import Path

import uvicorn
from sqlalchemy.exc import OperationalError
from uvicorn.config import HTTP_PROTOCOLS, WS_PROTOCOLS
from uvicorn.importer import import_from_string

from tether import event_loop
from tether.errors import ConfigError
from tether.home import service_file, tether_home, write_secret
from tether.logs import configure_logging
from tether.protocol import DEFAULT_PREFETCH, service_max_frame

from .app import Settings, create_app
from .auth import GlobusSettings
from .connections import ConnectionLimits, guarded_protocols
from .database import make_engine
from .schema import SchemaError, ensure_schema
from .settings import ServiceConfig, redact, service_config

LOCAL_USER = "local"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _ws_implementation() -> str:
    """uvicorn's sans-I/O websockets protocol where it exists (the legacy one is deprecated)."""
    try:
        import uvicorn.protocols.websockets.websockets_sansio_impl  # noqa: F401
    except ImportError:
        return "websockets"
    return "websockets-sansio"


def serve(cfg: ServiceConfig) -> None:
    """Serve until SIGTERM/SIGINT. The embedded default needs nothing but a writable TETHER_HOME.

    With a TLS certificate and key the service speaks https/wss only. Without them it refuses to
    listen beyond loopback (tokens would cross the network in clear) unless
    ``allow_insecure_http`` says the network is trusted. The store's schema is checked before
    the port is bound, so a replica that would misread its database never takes a connection.
    """
    where = f" (in {cfg.source})" if cfg.source else ""
    if cfg.advertise_url and not re.fullmatch(r"https?://[^/?#\s]+/?", cfg.advertise_url):
        sys.exit(f"tether service: advertise_url must be a replica's own base URL, http(s)://host:port, not "
                 f"{cfg.advertise_url!r}{where}")
    if cfg.advertise_url and cfg.advertise_url.startswith("http://") and cfg.tls_cert:
        sys.exit(f"tether service: this replica serves TLS: its advertise_url must be https://, not "
                 f"{cfg.advertise_url!r}{where}")
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        sys.exit(f"tether service: give both a TLS certificate and its key (tls.cert and tls.key, or --tls-cert "
                 f"and --tls-key), or neither{where}")
    for path in (cfg.tls_cert, cfg.tls_key, cfg.tls_ca):
        if path and not Path(path).is_file():
            sys.exit(f"tether service: {path} is not a file{where}")
    loopback_only = cfg.host in ("127.0.0.1", "::1", "localhost")
    if not cfg.tls_cert and not loopback_only and not cfg.allow_insecure_http:
        sys.exit(f"tether service: refusing to listen on {cfg.host} without TLS (tokens would cross the network in "
                 "clear); give tls.cert and tls.key (--tls-cert/--tls-key), or allow_insecure_http "
                 "(--allow-insecure-http) on a network you trust")
    globus = None
    if cfg.globus_client_id:
        if not cfg.globus_client_secret_file:
            sys.exit("tether service: a Globus client id needs its secret in a file (globus.client_secret_file, "
                     "--globus-client-secret-file; mode 0600)")
        try:
            globus = GlobusSettings.from_files(cfg.globus_client_id, cfg.globus_client_secret_file,
                                               cfg.globus_scope, cfg.globus_auth_url)
        except (OSError, ValueError) as exc:
            sys.exit(f"tether service: {exc}")
    if cfg.home:  # service.json and the default SQLite database live there
        os.environ["TETHER_HOME"] = str(cfg.resolved_home())
    if cfg.log_format:
        os.environ["TETHER_LOG_FORMAT"] = cfg.log_format
    configure_logging(cfg.log_level)
    home = tether_home()
    (home / "service").mkdir(parents=True, exist_ok=True, mode=0o700)
    db_url = cfg.resolved_db_url()
    if cfg.broker_url and db_url.startswith("sqlite"):
        sys.exit(f"tether service: replicas (broker_url) must share one database: give a PostgreSQL db_url{where}")
    engine = make_engine(db_url)
    try:
        ensure_schema(engine, cfg.auto_migrate, cfg.how_to_upgrade())
    except SchemaError as exc:
        sys.exit(f"tether service: {exc}")
    except OperationalError as exc:  # unreachable, refused, no such database: say which, without a traceback
        sys.exit(f"tether service: cannot use the database {redact(db_url)}: {str(exc.orig).strip()}")
    finally:
        engine.dispose()
    settings = Settings(db_url=db_url, globus=globus, broker_url=cfg.broker_url, replica_id=cfg.replica_id,
                        advertise_url=cfg.advertise_url.rstrip("/") if cfg.broker_url and cfg.advertise_url else None)
    for name in ("max_payload_bytes", "prefetch", "max_open_tasks_per_user", "result_retention_s",
                 "uncollected_retention_s", "purge_interval_s", "db_threads", "blob_threshold_bytes",
                 "max_blob_bytes", "blob_quota_bytes", "blob_orphan_s", "send_timeout_s",
                 "max_queued_bytes_per_connection", "function_quota_bytes", "function_retention_s"):
        value = getattr(cfg, name)
        if value is not None:
            setattr(settings, name, value)
    settings.blob_dir = cfg.blob_dir
    app = create_app(settings)

    # the local identity keeps its token across restarts, so clients and tests reconnect seamlessly;
    # on a shared database a starting replica never rotates it (the others' clients use it)
    previous = _read_json(service_file())
    if settings.db_url.startswith("sqlite"):
        _, token = app.state.store.create_user(LOCAL_USER, previous.get("token"))
    else:
        _, token = app.state.store.ensure_user(LOCAL_USER, previous.get("token"))

    host, port = cfg.host, cfg.port
    # proto must be IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on such sockets, and
    # without it Nagle + delayed ACKs add ~40 ms to every small frame
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sys.exit(f"tether service: cannot listen on {host}:{port}: {exc.strerror}; choose another port")
    bound_port = sock.getsockname()[1]
    url_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    url = f"{'https' if cfg.tls_cert else 'http'}://{url_host}:{bound_port}"
    info = {"url": url, "pid": os.getpid()}
    if token:  # None: the local user's token belongs to another replica's host (see docs/deploy.md)
        info["token"] = token
    if cfg.tls_ca:  # local clients verify the certificate against this CA (a private CA, a self-signed cert)
        info["ca_file"] = str(Path(cfg.tls_ca).resolve())
    write_secret(service_file(), json.dumps(info))

    limits = ConnectionLimits()
    for name, key in (("max_connections", "max_connections"), ("max_per_address", "max_connections_per_address"),
                      ("header_timeout_s", "header_timeout_s")):
        if getattr(cfg, key) is not None:
            setattr(limits, name, getattr(cfg, key))
    limits.fit_to_descriptors()
    http_protocol, ws_protocol = guarded_protocols(limits, import_from_string(HTTP_PROTOCOLS["auto"]),
                                                   import_from_string(WS_PROTOCOLS[_ws_implementation()]))
    config = uvicorn.Config(
        app,
        http=http_protocol,
        log_level=cfg.log_level,
        log_config=None,  # uvicorn's loggers go through ours (text or JSON, see tether.logs)
        ws=ws_protocol,
        ws_max_size=service_max_frame(settings.max_payload_bytes),  # what the Welcome announces
        ws_ping_interval=20,
        ws_ping_timeout=60,
        lifespan="on",
        loop=event_loop.name(),
        access_log=False,
        ssl_certfile=cfg.tls_cert,
        ssl_keyfile=cfg.tls_key,
    )
    server = uvicorn.Server(config)
    print(f"tether service listening on {url} (state in {home})", flush=True)
    server.run(sockets=[sock])


def parser() -> argparse.ArgumentParser:
    """The server's flags: one per config key (``tls.cert`` is ``--tls-cert``); a flag given
    overrides the file, a flag left out (None) does not."""
    p = argparse.ArgumentParser(prog="python -m tether.service.server")
    p.add_argument("--config", default=None, metavar="FILE", help="service.yaml (see docs/deploy.md)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--home", default=None, help="TETHER_HOME of the service (service.json, the default database)")
    p.add_argument("--db-url", default=None)
    p.add_argument("--db-threads", type=int, default=None,
                   help="threads (database connections) per replica for PostgreSQL")
    p.add_argument("--auto-migrate", action="store_const", const=True, default=None,
                   help="PostgreSQL: upgrade an outdated schema at start instead of refusing")
    p.add_argument("--broker-url", default=None, help="RabbitMQ between replicas: amqp://user:password@host/vhost")
    p.add_argument("--replica-id", default=None, help="this replica's name in logs and on the broker (default: random)")
    p.add_argument("--advertise-url", default=None, metavar="URL",
                   help="with a broker: the URL at which clients reach this replica itself (https://host:port); "
                        "clients then send an endpoint's tasks to the replica that holds it (see docs/deploy.md)")
    p.add_argument("--max-payload-bytes", type=int, default=None)
    p.add_argument("--log-level", default=None)
    p.add_argument("--log-format", choices=["text", "json"], default=None)
    p.add_argument("--prefetch", type=int, default=None,
                   help=f"tasks an endpoint is sent beyond its workers (default {DEFAULT_PREFETCH})")
    p.add_argument("--max-open-tasks-per-user", type=int, default=None,
                   help="tasks a user may have waiting or running at once (default 2,000,000)")
    p.add_argument("--result-retention", type=float, default=None, metavar="SECONDS", dest="result_retention_s",
                   help="collected results are deleted this long after collection (default 7 days)")
    p.add_argument("--uncollected-retention", type=float, default=None, metavar="SECONDS",
                   dest="uncollected_retention_s",
                   help="results nobody collects are deleted this long after their task ended (default 30 days)")
    p.add_argument("--purge-interval", type=float, default=None, metavar="SECONDS", dest="purge_interval_s",
                   help="how often expired results and blobs are deleted (default 600)")
    p.add_argument("--blob-dir", default=None,
                   help="where blob files live (default <home>/service/blobs); replicas must share it")
    p.add_argument("--blob-threshold-bytes", type=int, default=None,
                   help="payloads above this travel as blobs, streamed through the service's disk (default 8 MiB)")
    p.add_argument("--max-blob-bytes", type=int, default=None, help="largest blob accepted (default 16 GiB)")
    p.add_argument("--blob-quota-bytes", type=int, default=None,
                   help="bytes of blobs one user may have stored at once (default 100 GiB)")
    p.add_argument("--function-quota-bytes", type=int, default=None,
                   help="bytes of function bodies one user may keep (default 1 GiB)")
    p.add_argument("--function-retention", type=float, default=None, metavar="SECONDS", dest="function_retention_s",
                   help="a function body no stored task names is deleted this long after it was last sent "
                        "(default 30 days)")
    p.add_argument("--blob-orphan-seconds", type=float, default=None, dest="blob_orphan_s",
                   help="a blob no task names is deleted this long after it was declared (default 3600)")
    p.add_argument("--max-connections", type=int, default=None,
                   help="connections held at once, in all (default 2048, and below the open-file limit)")
    p.add_argument("--max-connections-per-address", type=int, default=None,
                   help="connections held at once from one address (default 256; 0: no cap, as behind a balancer)")
    p.add_argument("--header-timeout", type=float, default=None, metavar="SECONDS", dest="header_timeout_s",
                   help="a connection that sends no complete request headers in this time is dropped (default 10)")
    p.add_argument("--send-timeout", type=float, default=None, metavar="SECONDS", dest="send_timeout_s",
                   help="a peer that takes no frame in this time is dropped (default 30)")
    p.add_argument("--max-queued-bytes-per-connection", type=int, default=None,
                   help="bytes that may wait for a peer that reads slowly before it is dropped (default 64 MiB)")
    p.add_argument("--tls-cert", default=None)
    p.add_argument("--tls-key", default=None)
    p.add_argument("--tls-ca", default=None)
    p.add_argument("--allow-insecure-http", action="store_const", const=True, default=None)
    p.add_argument("--globus-client-id", default=None)
    p.add_argument("--globus-client-secret-file", default=None)
    p.add_argument("--globus-scope", default=None)
    p.add_argument("--globus-auth-url", default=None)
    return p


def main(argv: list[str] | None = None) -> None:
    args = vars(parser().parse_args(argv))
    config_file = args.pop("config")
    try:
        cfg = service_config(config_file, **args)
    except ConfigError as exc:
        sys.exit(f"tether service: {exc}")
    serve(cfg)


if __name__ == "__main__":
    main()
