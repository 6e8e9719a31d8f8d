"""Run the service: bind, make sure the local identity exists, write service.json, serve.

``python -m tether.service.server`` is what ``tether service start --detach`` launches.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import uvicorn

from tether.config import service_file, tether_home, write_secret
from tether.logs import configure_logging
from tether.protocol import DEFAULT_PREFETCH, service_max_frame

from .app import Settings, create_app
from .auth import GlobusSettings

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


def serve(host: str = "127.0.0.1", port: int = 8421, db_url: str | None = None,
          max_payload_bytes: int | None = None, log_level: str = "warning", prefetch: int | None = None,
          uncollected_retention_s: float | None = None, tls_cert: str | None = None, tls_key: str | None = None,
          tls_ca: str | None = None, allow_insecure_http: bool = False, globus: GlobusSettings | None = None,
          broker_url: str | None = None, replica_id: str | None = None) -> None:
    """Serve until SIGTERM/SIGINT. The embedded default needs nothing but a writable TETHER_HOME.

    With ``tls_cert``/``tls_key`` the service speaks https/wss only. Without them it refuses to
    listen beyond loopback (tokens would cross the network in clear) unless
    ``allow_insecure_http`` says the network is trusted.
    """
    if bool(tls_cert) != bool(tls_key):
        sys.exit("tether service: give both --tls-cert and --tls-key (PEM files), or neither")
    for path in (tls_cert, tls_key, tls_ca):
        if path and not Path(path).is_file():
            sys.exit(f"tether service: {path} is not a file")
    loopback_only = host in ("127.0.0.1", "::1", "localhost")
    if not tls_cert and not loopback_only and not allow_insecure_http:
        sys.exit(f"tether service: refusing to listen on {host} without TLS (tokens would cross the network in "
                 "clear); pass --tls-cert and --tls-key, or --allow-insecure-http on a network you trust")
    home = tether_home()
    (home / "service").mkdir(parents=True, exist_ok=True, mode=0o700)
    default_db = f"sqlite:///{home / 'service' / 'tether.db'}"
    settings = Settings(db_url=db_url or os.environ.get("TETHER_DB_URL") or default_db, globus=globus,
                        broker_url=broker_url, replica_id=replica_id)
    if broker_url and settings.db_url.startswith("sqlite"):
        sys.exit("tether service: replicas (--broker-url) must share one database: give a PostgreSQL --db-url")
    if max_payload_bytes:
        settings.max_payload_bytes = max_payload_bytes
    if prefetch is not None:
        settings.prefetch = prefetch
    if uncollected_retention_s is not None:
        settings.uncollected_retention_s = uncollected_retention_s
    app = create_app(settings)

    # the local identity keeps its token across restarts, so clients and tests reconnect seamlessly
    previous = _read_json(service_file())
    _, token = app.state.store.create_user(LOCAL_USER, previous.get("token"))

    # proto must be IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on such sockets, and
    # without it Nagle + delayed ACKs add ~40 ms to every small frame
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sys.exit(f"tether service: cannot listen on {host}:{port}: {exc.strerror}; choose another --port")
    bound_port = sock.getsockname()[1]
    url_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    url = f"{'https' if tls_cert else 'http'}://{url_host}:{bound_port}"
    info = {"url": url, "token": token, "pid": os.getpid()}
    if tls_ca:  # local clients verify the certificate against this CA (a private CA, a self-signed cert)
        info["ca_file"] = str(Path(tls_ca).resolve())
    write_secret(service_file(), json.dumps(info))

    configure_logging(log_level)
    config = uvicorn.Config(
        app,
        log_level=log_level,
        log_config=None,  # uvicorn's loggers go through ours (text or JSON, see tether.logs)
        ws=_ws_implementation(),
        ws_max_size=service_max_frame(settings.max_payload_bytes),  # what the Welcome announces
        ws_ping_interval=20,
        ws_ping_timeout=60,
        lifespan="on",
        access_log=False,
        ssl_certfile=tls_cert,
        ssl_keyfile=tls_key,
    )
    server = uvicorn.Server(config)
    print(f"tether service listening on {url} (state in {home})", flush=True)
    server.run(sockets=[sock])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tether.service.server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8421)
    parser.add_argument("--db-url", default=None)
    parser.add_argument("--max-payload-bytes", type=int, default=None)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--prefetch", type=int, default=None,
                        help=f"tasks an endpoint is sent beyond its workers (default {DEFAULT_PREFETCH})")
    parser.add_argument("--uncollected-retention", type=float, default=None, metavar="SECONDS",
                        help="results nobody collects are deleted this long after their task ended (default 30 days)")
    parser.add_argument("--tls-cert", default=None)
    parser.add_argument("--tls-key", default=None)
    parser.add_argument("--tls-ca", default=None)
    parser.add_argument("--allow-insecure-http", action="store_true")
    parser.add_argument("--globus-client-id", default=None)
    parser.add_argument("--globus-client-secret-file", default=None)
    parser.add_argument("--globus-scope", default=None)
    parser.add_argument("--globus-auth-url", default=None)
    parser.add_argument("--broker-url", default=None,
                        help="RabbitMQ (amqp://user:pass@host/vhost) shared by several replicas of this service")
    parser.add_argument("--replica-id", default=None, help="this replica's name in logs and on the broker")
    args = parser.parse_args(argv)
    globus = None
    if args.globus_client_id:
        if not args.globus_client_secret_file:
            sys.exit("tether service: --globus-client-id needs --globus-client-secret-file (a 0600 file)")
        try:
            globus = GlobusSettings.from_files(args.globus_client_id, args.globus_client_secret_file,
                                               args.globus_scope, args.globus_auth_url)
        except (OSError, ValueError) as exc:
            sys.exit(f"tether service: {exc}")
    serve(args.host, args.port, args.db_url, args.max_payload_bytes, args.log_level, args.prefetch,
          args.uncollected_retention, args.tls_cert, args.tls_key, args.tls_ca, args.allow_insecure_http, globus,
          args.broker_url, args.replica_id)


if __name__ == "__main__":
    main()
