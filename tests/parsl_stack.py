"""For the Parsl plugin's tests: a DataFlowKernel per test, a TetherExecutor on a stack, a service +
an endpoint whose config.yaml the test writes (for the Parsl engines), and an endpoint that cannot
see a directory of this machine, as real processes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import parsl
from parsl.config import Config

from tether.local import LocalStack
from tether.parsl import TetherExecutor


def tether_executor(stack: LocalStack, label: str = "tether", endpoint_id: str | None = None,
                    **kwargs: object) -> TetherExecutor:
    return TetherExecutor(endpoint_id=endpoint_id or stack.endpoint_id, label=label, service=stack.service_url,
                          token=stack.token, **kwargs)


@contextlib.contextmanager
def loaded(tmp_path: Path, *executors: TetherExecutor, **config: object) -> Iterator[parsl.DataFlowKernel]:
    """A DataFlowKernel for one test; cleaned up (and Parsl's global DFK cleared) after it."""
    dfk = parsl.load(Config(executors=list(executors), run_dir=str(tmp_path / "runinfo"), **config))
    try:
        yield dfk
    finally:
        dfk.cleanup()
        parsl.clear()


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


def blind_endpoint_missing() -> str | None:
    """Why :func:`endpoint_blind_to` cannot run here (None if it can): it needs root and ``unshare``."""
    if os.geteuid() != 0:
        return "needs root, to start an endpoint in a mount namespace of its own (unshare --mount)"
    if shutil.which("unshare") is None:
        return "needs unshare(1) (util-linux)"
    return None


@contextlib.contextmanager
def endpoint_blind_to(stack: LocalStack, name: str, hidden: Path, engine: str = "process") -> Iterator[str]:
    """An endpoint on the stack's service whose processes cannot see ``hidden``: it starts in a
    mount namespace of its own where an empty tmpfs covers that directory, as a machine that
    shares no file system with this one would see it. Yields its endpoint id."""
    import dataclasses

    other = dataclasses.replace(stack, endpoint_name=name)
    other.configure_endpoint(engine, 2)
    script = ('mount -t tmpfs -o size=1m,mode=0700 tether-blind "$1" && '
              'exec "$2" -m tether.cli endpoint start "$3" --detach')
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(hidden),
                          sys.executable, name], env=stack.env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"the blind endpoint did not start:\n{out.stdout}\n{out.stderr}"
    try:
        yield out.stdout.strip().splitlines()[-1].strip()
    finally:
        other.stop_endpoint()
