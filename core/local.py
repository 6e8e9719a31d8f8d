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
from .processes import signal_and_wait


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

    def _service_json(self) -> dict:
        return json.loads((self.home / "service.json").read_text())

    def start_service(self, *extra: str) -> None:
        _cli(self.env, "service", "start", "--detach", "--port", str(self.port), *extra)
        info = self._service_json()
        self.service_url, self.token = info["url"], info["token"]
        self.port = int(self.service_url.rsplit(":", 1)[1])

    def service_pid(self) -> int:
        return int(self._service_json()["pid"])

    def kill_service(self, sig: int = signal.SIGKILL) -> None:
        signal_and_wait(self.service_pid(), sig, 10)

    def stop_service(self) -> None:
        with contextlib.suppress(Exception):
            _cli(self.env, "service", "stop", timeout=30)

    def configure_endpoint(self, engine: str = "process", workers: int = 2, name: str | None = None) -> None:
        _cli(self.env, "endpoint", "configure", name or self.endpoint_name, "--engine", engine,
             "--workers", str(workers), "--force")

    def start_endpoint(self, name: str | None = None) -> str:
        out = _cli(self.env, "endpoint", "start", name or self.endpoint_name, "--detach")
        endpoint_id = out.strip().splitlines()[-1].strip()
        if name is None or name == self.endpoint_name:
            self.endpoint_id = endpoint_id
        return endpoint_id

    def endpoint_pid(self, name: str | None = None) -> int | None:
        path = self.home / "endpoints" / (name or self.endpoint_name) / "daemon.pid"
        try:
            return int(path.read_text())
        except (OSError, ValueError):
            return None

    def kill_endpoint(self, sig: int = signal.SIGKILL, name: str | None = None) -> None:
        pid = self.endpoint_pid(name)
        if pid:
            signal_and_wait(pid, sig, 10)

    def stop_endpoint(self, name: str | None = None) -> None:
        with contextlib.suppress(Exception):
            _cli(self.env, "endpoint", "stop", name or self.endpoint_name, timeout=30)

    def endpoint_dir(self, name: str | None = None) -> Path:
        return self.home / "endpoints" / (name or self.endpoint_name)


@contextlib.contextmanager
def local_stack(home: str | Path | None = None, engine: str = "process", workers: int = 2,
                service_args: tuple[str, ...] = ()) -> Iterator[LocalStack]:
    """Start a service and an endpoint in ``home`` (a temporary directory by default); stop both after."""
    with contextlib.ExitStack() as cleanup:
        if home is None:
            home = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="tether-"))
        home = Path(home)
        env = {k: v for k, v in os.environ.items() if k not in ("TETHER_SERVICE_URL", "TETHER_TOKEN")}
        env["TETHER_HOME"] = str(home)
        stack = LocalStack(home=home, env=env)
        try:
            stack.start_service(*service_args)
            stack.configure_endpoint(engine, workers)
            stack.start_endpoint()
            yield stack
        finally:
            from .connection import Connection

            Connection.close_all(stack.service_url)  # no reconnect attempts to a service we are stopping
            stack.stop_endpoint()
            stack.stop_service()
