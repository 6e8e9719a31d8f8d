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
          uncollected_retention_s: float | None = None) -> None:
    """Serve until SIGTERM/SIGINT. The embedded default needs nothing but a writable TETHER_HOME."""
    home = tether_home()
    (home / "service").mkdir(parents=True, exist_ok=True, mode=0o700)
    default_db = f"sqlite:///{home / 'service' / 'tether.db'}"
    settings = Settings(db_url=db_url or os.environ.get("TETHER_DB_URL") or default_db)
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
    url = f"http://{url_host}:{bound_port}"
    write_secret(service_file(), json.dumps({"url": url, "token": token, "pid": os.getpid()}))

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
    args = parser.parse_args(argv)
    serve(args.host, args.port, args.db_url, args.max_payload_bytes, args.log_level, args.prefetch,
          args.uncollected_retention)


if __name__ == "__main__":
    main()
