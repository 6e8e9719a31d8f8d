"""A whole Tether on this machine: an embedded service and one endpoint, as real processes.

For trying Tether out, for tests and for benchmarks::

    from tether.local import local_stack
    with local_stack(engine="process", workers=2) as stack:
        with Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token) as ex:
            ...

Everything lives in its own ``TETHER_HOME`` (a temporary directory by default) and is
started through the same CLI a user types, so what this exercises is what users run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TetherError
from .ids import check_name, child_path
from .processes import SERVICE_COMMANDS, endpoint_commands, is_recorded_process, signal_and_wait


def _cli(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    proc = subprocess.run([sys.executable, "-m", "tether.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise TetherError(f"'tether {' '.join(args)}' failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@dataclass
class LocalStack:
    """Handles on a running local service + endpoint, with the controls tests need."""

    home: Path
    endpoint_name: str = "local"
    env: dict[str, str] = field(default_factory=dict)
    service_url: str = ""
    token: str = ""
    endpoint_id: str = ""
    port: int = 0
    #: arguments of every service start (a restart keeps the same database, say); extra ones follow
    service_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_name(self.endpoint_name)

    def _service_json(self) -> dict:
        return json.loads((self.home / "service.json").read_text())

    def start_service(self, *extra: str) -> None:
        _cli(self.env, "service", "start", "--detach", "--port", str(self.port), *self.service_args, *extra)
        info = self._service_json()
        self.service_url, self.token = info["url"], info["token"]
        self.port = int(self.service_url.rsplit(":", 1)[1])

    def service_pid(self) -> int:
        return int(self._service_json()["pid"])

    def kill_service(self, sig: int = signal.SIGKILL) -> None:
        """Signal the service (a test's kill switch); a stale pid in service.json is left alone."""
        pid, written = self.service_pid(), _mtime(self.home / "service.json")
        if is_recorded_process(pid, SERVICE_COMMANDS, written):
            signal_and_wait(pid, sig, 10)

    def stop_service(self) -> None:
        with contextlib.suppress(Exception):
            _cli(self.env, "service", "stop", timeout=30)

    def configure_endpoint(self, engine: str = "process", workers: int = 2, name: str | None = None) -> None:
        _cli(self.env, "endpoint", "configure", check_name(name or self.endpoint_name), "--engine", engine,
             "--workers", str(workers), "--force")

    def start_endpoint(self, name: str | None = None) -> str:
        out = _cli(self.env, "endpoint", "start", check_name(name or self.endpoint_name), "--detach")
        endpoint_id = out.strip().splitlines()[-1].strip()
        if name is None or name == self.endpoint_name:
            self.endpoint_id = endpoint_id
        return endpoint_id

    def endpoint_pid(self, name: str | None = None) -> int | None:
        """The pid in the endpoint's daemon.pid (as written; :meth:`kill_endpoint` verifies it)."""
        path = self.endpoint_dir(name) / "daemon.pid"
        try:
            return int(path.read_text())
        except (OSError, ValueError):
            return None

    def kill_endpoint(self, sig: int = signal.SIGKILL, name: str | None = None) -> None:
        """Signal the endpoint daemon (a test's kill switch); a stale pid file is left alone."""
        name = name or self.endpoint_name
        pid, written = self.endpoint_pid(name), _mtime(self.endpoint_dir(name) / "daemon.pid")
        if pid and is_recorded_process(pid, endpoint_commands(name), written):
            signal_and_wait(pid, sig, 10)

    def stop_endpoint(self, name: str | None = None) -> None:
        with contextlib.suppress(Exception):
            _cli(self.env, "endpoint", "stop", check_name(name or self.endpoint_name), timeout=30)

    def endpoint_dir(self, name: str | None = None) -> Path:
        return child_path(self.home / "endpoints", name or self.endpoint_name, "endpoint name", check=check_name)


def _mtime(path: Path) -> float:
    """When a pid file was written; 0 (no process qualifies) if it is gone."""
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


@contextlib.contextmanager
def local_stack(home: str | Path | None = None, engine: str = "process", workers: int = 2,
                service_args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> Iterator[LocalStack]:
    """Start a service and an endpoint in ``home`` (a temporary directory by default); stop both after.

    ``env``: more environment for every command of the stack (``TETHER_DB_URL``, say, which the
    service and the ``tether service`` commands then share)."""
    with contextlib.ExitStack() as cleanup:
        if home is None:
            home = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="tether-"))
        home = Path(home)
        extra = env or {}
        env = {k: v for k, v in os.environ.items() if k not in ("TETHER_SERVICE_URL", "TETHER_TOKEN")}
        env.update(extra, TETHER_HOME=str(home))
        stack = LocalStack(home=home, env=env, service_args=tuple(service_args))
        try:
            stack.start_service()
            stack.configure_endpoint(engine, workers)
            stack.start_endpoint()
            yield stack
        finally:
            from .connection import Connection

            Connection.close_all(stack.service_url)  # no reconnect attempts to a service we are stopping
            stack.stop_endpoint()
            stack.stop_service()
