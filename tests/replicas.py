"""Several service replicas on one PostgreSQL database and one RabbitMQ, behind a real haproxy.

What an operator runs (docs/deploy.md), made small: every replica is
``python -m tether.service.server --db-url postgresql+psycopg://... --broker-url amqp://...``
on its own port, and haproxy on one more port sends HTTP and WebSocket connections to any
live one (health-checked on /healthz). Clients and endpoints are started with the URL of one
replica or of the load balancer.

Needs PostgreSQL (127.0.0.1:5432, trust auth), RabbitMQ (127.0.0.1:5672, guest/guest) and
Debian's haproxy; :func:`missing` says which is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

from conftest import PG_DSN, pg_missing, tether_cli, wait_for

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def missing() -> str | None:
    """Why replicas cannot run here, or None."""
    no_pg = pg_missing()
    if no_pg:
        return no_pg
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=3).close()
    except OSError:
        return "no RabbitMQ on 127.0.0.1:5672"
    try:
        import aio_pika  # noqa: F401
    except ImportError:
        return "aio-pika is not installed (pip install 'tether[broker]')"
    if shutil.which("haproxy") is None:
        return "haproxy is not installed (apt-get install haproxy)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HAPROXY_CFG = """
global
    maxconn 4096
defaults
    mode http
    timeout connect 2s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    retries 3
    option redispatch
frontend tether
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /healthz
    default-server inter 300ms fall 2 rise 1
{servers}
"""


class Replicas:
    """``n`` replicas on a fresh database, haproxy in front; everything stopped by :meth:`close`."""

    def __init__(self, root: Path, n: int = 2, db_threads: int | None = None, log_level: str = "info",
                 database_settings: dict[str, str] | None = None, advertise: bool = True):
        """``log_level`` is the replicas' (tests read their logs at ``info``; benchmarks keep the
        default ``warning`` of a real service so logging costs what it costs in production).
        ``database_settings`` are set on the fresh database only (``ALTER DATABASE ... SET``), so
        a benchmark can try, say, ``synchronous_commit = off`` without touching the server.
        ``advertise``: each replica advertises its own URL (``--advertise-url``), so clients send
        an endpoint's tasks to the replica holding it; False keeps every client on the replica it
        connected to (tasks for endpoints held elsewhere cross through the broker)."""
        import psycopg

        self.root = root
        self.home = root / "home"
        self.home.mkdir(parents=True)
        self.dbname = f"tether_replicas_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {self.dbname}")
            for key, value in (database_settings or {}).items():
                conn.execute(f"ALTER DATABASE {self.dbname} SET {key} = {value}")
        self.db_url = f"{PG_URL}/{self.dbname}"
        self.db_threads = db_threads
        self.log_level = log_level
        self.env = {k: v for k, v in os.environ.items() if k not in ("TETHER_SERVICE_URL", "TETHER_TOKEN")}
        self.env["TETHER_HOME"] = str(self.home)
        # replica ids name the broker queues: unique per group, so groups (tests and benchmarks run
        # by others on the same RabbitMQ) never contend for one exclusive queue
        self.replica_ids = [f"r{i}-{self.dbname[-10:]}" for i in range(n)]
        self.ports = [free_port() for _ in range(n)]
        #: the URL each replica advertises to clients (its own port: clients then send an endpoint's
        #: tasks to the replica holding it); a test may set one unreachable before start
        self.advertise: list[str | None] = [self.url(i) if advertise else None for i in range(n)]
        self.procs: list[subprocess.Popen | None] = [None] * n
        self.lb_port = free_port()
        self.lb: subprocess.Popen | None = None
        self.token = ""
        try:
            for i in range(n):  # one after the other: the first makes the local user's token, the rest keep it
                self.start(i)
            self.token = json.loads((self.home / "service.json").read_text())["token"]
            self._start_haproxy()
        except BaseException:  # a half-started group (or Ctrl-C) leaves no process and no database behind
            self.close()
            raise

    # --- replicas --------------------------------------------------------------------------
    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    @property
    def lb_url(self) -> str:
        return f"http://127.0.0.1:{self.lb_port}"

    def start(self, i: int) -> None:
        log = open(self.root / f"replica-{i}.log", "ab")  # noqa: SIM115 - kept open by the child
        threads = ("--db-threads", str(self.db_threads)) if self.db_threads else ()
        self.procs[i] = subprocess.Popen(
            [sys.executable, "-m", "tether.service.server", "--port", str(self.ports[i]), "--db-url", self.db_url,
             "--broker-url", AMQP_URL, "--replica-id", self.replica_ids[i], "--log-level", self.log_level,
             *(("--advertise-url", url) if (url := self.advertise[i]) else ()), *threads],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_for(lambda: self.healthy(i), timeout=60, what=f"replica {i} to answer /healthz")

    def healthy(self, i: int) -> bool:
        proc = self.procs[i]
        if proc is None or proc.poll() is not None:
            if proc is not None:
                raise RuntimeError(f"replica {i} exited ({proc.returncode}):\n{self.log(i)[-3000:]}")
            return False
        try:
            return httpx.get(self.url(i) + "/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=30)
        self.procs[i] = None

    def log(self, i: int) -> str:
        return (self.root / f"replica-{i}.log").read_text(errors="replace")

    def holder_of(self, endpoint_id: str) -> int | None:
        """Which replica an endpoint is connected to (what it wrote in the database)."""
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={self.dbname}") as conn:
            row = conn.execute("SELECT status FROM endpoints WHERE id = %s", (endpoint_id,)).fetchone()
        status = json.loads(row[0]) if row and row[0] else {}
        replica = status.get("replica") if status.get("online") else None
        return self.replica_ids.index(replica) if replica in self.replica_ids else None

    # --- haproxy ---------------------------------------------------------------------------
    def _start_haproxy(self) -> None:
        servers = "\n".join(f"    server r{i} 127.0.0.1:{p} check" for i, p in enumerate(self.ports))
        cfg = self.root / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(port=self.lb_port, servers=servers))
        log = open(self.root / "haproxy.log", "ab")  # noqa: SIM115 - kept open by the child
        self.lb = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        log.close()

        def up() -> bool:
            try:
                return httpx.get(self.lb_url + "/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=30, what="haproxy to pass requests to the replicas")

    # --- endpoints -------------------------------------------------------------------------
    def endpoint_env(self, url: str) -> dict[str, str]:
        return {**self.env, "TETHER_SERVICE_URL": url, "TETHER_TOKEN": self.token}

    def start_endpoint(self, name: str, url: str, workers: int = 2, engine: str = "process") -> str:
        """Configure, register (through ``url``) and start an endpoint; returns its id."""
        env = self.endpoint_env(url)
        tether_cli(env, "endpoint", "configure", name, "--engine", engine, "--workers", str(workers), "--force")
        out = tether_cli(env, "endpoint", "start", name, "--detach").stdout
        return out.strip().splitlines()[-1].strip()

    def stop_endpoint(self, name: str) -> None:
        tether_cli(self.env, "endpoint", "stop", name, check=False)  # stopping what may have stopped already

    def close(self) -> None:
        import psycopg

        for name in [p.name for p in (self.home / "endpoints").glob("*")] if (self.home / "endpoints").exists() else []:
            self.stop_endpoint(name)
        for i in range(len(self.procs)):
            try:
                self.kill(i, signal.SIGTERM)
            except subprocess.TimeoutExpired:  # a replica stuck in its shutdown: never leave it running
                self.kill(i, signal.SIGKILL)
        if self.lb is not None:
            self.lb.terminate()
            self.lb.wait(timeout=10)
            self.lb = None
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(PG_DSN, autocommit=True) as conn:
                    conn.execute(f"DROP DATABASE IF EXISTS {self.dbname} WITH (FORCE)")
                return
            except psycopg.OperationalError:  # PostgreSQL restarting (a test restarted it)
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
