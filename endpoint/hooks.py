"""``endpoint_setup`` and ``endpoint_teardown``: the administrator's own commands around a daemon.

Sites load modules, mount scratch or start an agent before an endpoint may serve, and undo it
after (Globus Compute has the same two keys). Each is a shell command run with ``/bin/sh -c``
in the endpoint's directory, as the daemon's user, with ``TETHER_ENDPOINT_NAME`` (and, once
registered, ``TETHER_ENDPOINT_ID``) set. A setup that fails (non-zero exit, or longer than
``endpoint_hook_timeout_s``) stops the start, in words, with the end of its output; a teardown
that fails is logged, and the daemon's stop goes on. A daemon killed with SIGKILL runs no teardown.
"""

from __future__ import annotations

import logging
import os
import subprocess
from typing import TYPE_CHECKING

from tether.errors import ConfigError

if TYPE_CHECKING:
    from .config import EndpointConfig

log = logging.getLogger("tether.endpoint.hooks")

#: the end of a hook's output kept for the log and for a failure's message
OUTPUT_TAIL = 4096


def run_hook(config: EndpointConfig, which: str, endpoint_id: str | None = None) -> None:
    """Run ``config.<which>`` (``endpoint_setup`` or ``endpoint_teardown``) if it is set; a
    failing setup raises ConfigError, a failing teardown is logged."""
    command = getattr(config, which)
    if not command:
        return
    env = {**os.environ, "TETHER_ENDPOINT_NAME": config.name}
    if endpoint_id:
        env["TETHER_ENDPOINT_ID"] = endpoint_id
    log.info("%s: running %r", which, command)
    try:
        done = subprocess.run(["/bin/sh", "-c", command], cwd=config.dir, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=config.endpoint_hook_timeout_s,
                              check=False)
        output, problem = done.stdout[-OUTPUT_TAIL:].decode(errors="replace"), (
            f"exited with code {done.returncode}" if done.returncode else None)
    except subprocess.TimeoutExpired as exc:
        output = (exc.output or b"")[-OUTPUT_TAIL:].decode(errors="replace")
        problem = f"did not finish within endpoint_hook_timeout_s ({config.endpoint_hook_timeout_s:g} s)"
    for line in output.splitlines()[-20:]:
        log.info("%s: %s", which, line)
    if problem is None:
        return
    message = f"{which} ({command!r}) {problem}" + (f"; its last output:\n  {output.strip()[-1500:]}" if output.strip()
                                                      else "")
    if which == "endpoint_setup":
        raise ConfigError(message + f"\nfix the command in {config.dir / 'config.yaml'} (or remove {which}) and start "
                                    "the endpoint again")
    log.warning("%s", message)


__all__ = ["run_hook"]
