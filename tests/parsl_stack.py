"""A service + an endpoint whose config.yaml the test writes (for the Parsl engines), as real processes."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tether.local import LocalStack


@contextlib.contextmanager
def engine_stack(home: Path, config_yaml: str) -> Iterator[LocalStack]:
    """Start a service, write ``config_yaml`` as the endpoint's config.yaml, start the endpoint."""
    env = {k: v for k, v in os.environ.items() if k not in ("TETHER_SERVICE_URL", "TETHER_TOKEN")}
    env["TETHER_HOME"] = str(home)
    stack = LocalStack(home=home, env=env)
    try:
        stack.start_service()
        stack.configure_endpoint("htex", 2)
        (stack.endpoint_dir() / "config.yaml").write_text(config_yaml)
        stack.start_endpoint()
        yield stack
    finally:
        from tether.connection import Connection

        Connection.close_all(stack.service_url)
        stack.stop_endpoint()
        stack.stop_service()


def endpoint_status(stack: LocalStack) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "tether.cli", "endpoint", "status", stack.endpoint_name, "--json"],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def service_capacity(stack: LocalStack) -> dict:
    """The capacity the endpoint's last heartbeat carried, as the service shows it."""
    return ((endpoint_status(stack).get("service") or {}).get("status") or {}).get("capacity") or {}
