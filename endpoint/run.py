"""Run one endpoint's daemon in this process: ``python -m tether.endpoint.run NAME`` (what
``tether endpoint start`` runs, detached or in the foreground).

It loads the endpoint's configuration and credential, takes the endpoint's lock (one daemon per
endpoint: a second would take over the first one's connection), records its pid, and runs the
daemon the configuration asks for: an ordinary one, or a multi-user one.
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path
from typing import Any

from tether import event_loop
from tether.errors import ConfigError
from tether.logs import configure_logging

from .config import load_config
from .credential import read_credential
from .daemon import EndpointDaemon
from .hooks import run_hook
from .multi_user import MultiUserDaemon


def run_daemon(name: str) -> int:
    config = load_config(name)
    credential = read_credential(config.dir)
    lock = _hold_lock(config.dir, name)  # one daemon per endpoint: a second would take over its connection
    configure_logging("INFO")
    (config.dir / "daemon.pid").write_text(str(os.getpid()))
    # tasks (and the worker processes, which inherit it) start in the endpoint's tasks/ directory
    (config.dir / "tasks").mkdir(parents=True, exist_ok=True)
    os.chdir(config.dir / "tasks")
    daemon_class = MultiUserDaemon if config.multi_user else EndpointDaemon
    try:
        run_hook(config, "endpoint_setup", credential.get("endpoint_id"))  # a failure stops the start, in words
        try:
            return event_loop.run(daemon_class(config, credential).run())
        finally:
            run_hook(config, "endpoint_teardown", credential.get("endpoint_id"))
    finally:
        (config.dir / "daemon.pid").unlink(missing_ok=True)
        lock.close()


def _hold_lock(directory: Path, name: str) -> Any:
    """Lock ``daemon.lock`` for this process's life (the kernel lets go when it ends, however it
    ends), or refuse to run: another daemon of this endpoint holds it."""
    fh = open(directory / "daemon.lock", "a+")  # noqa: SIM115 - held open until the daemon ends
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        try:
            pid = f" (pid {int((directory / 'daemon.pid').read_text())})"
        except (OSError, ValueError):
            pid = ""
        raise ConfigError(f"endpoint {name!r} is already running{pid}; stop it first: tether endpoint stop "
                          f"{name}") from None
    return fh


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tether.endpoint.run NAME")
    try:
        sys.exit(run_daemon(sys.argv[1]))
    except ConfigError as exc:
        sys.exit(f"tether endpoint: {exc}")


__all__ = ["run_daemon"]

if __name__ == "__main__":
    main()
