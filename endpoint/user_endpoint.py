"""A user endpoint process: started by a multi-user endpoint as a user's own account, it runs
that user's tasks with the configuration rendered for them.

``python -m tether.endpoint.user_endpoint`` reads its start document (configuration,
credential, service) from stdin, so no secret is ever in argv or the environment. Before it
does anything else it makes sure it cannot act as root: it must not be uid 0, must fail to
regain uid 0, and sets ``PR_SET_NO_NEW_PRIVS`` so no setuid program it runs gains privileges
(this also blocks setuid helpers some schedulers' commands rely on: documented in
docs/multi-user.md).
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

PR_SET_NO_NEW_PRIVS = 38


def drop_check() -> None:
    """Refuse to go on with any way back to root."""
    if os.getuid() == 0 or os.geteuid() == 0 or os.getgid() == 0 or os.getegid() == 0:
        sys.exit("tether user endpoint: refusing to run as root")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:  # pragma: no cover - only on a broken setuid setup
        sys.exit("tether user endpoint: could regain root; refusing to run")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        sys.exit(f"tether user endpoint: prctl(PR_SET_NO_NEW_PRIVS) failed (errno {ctypes.get_errno()})")


def main() -> None:
    drop_check()
    os.umask(0o077)
    doc = json.loads(sys.stdin.read())
    sys.stdin.close()

    from tether import event_loop
    from tether.logs import configure_logging

    from .config import endpoint_dir, parse_config
    from .daemon import EndpointDaemon

    configure_logging("INFO")
    name = doc["name"]
    directory = endpoint_dir(name)
    (directory / "tasks").mkdir(parents=True, exist_ok=True, mode=0o700)
    (directory / "config.yaml").write_text(doc["config_yaml"])  # for the user to read; not a secret
    config = parse_config(name, doc["config_yaml"], str(directory / "config.yaml"))
    credential = {"endpoint_id": doc["endpoint_id"], "secret": doc["secret"], "service_url": doc["service_url"],
                  "ca_file": doc.get("ca_file")}
    os.chdir(directory / "tasks")
    daemon = EndpointDaemon(config, credential)  # the credential stays in memory only
    daemon.idle_exit_s = doc.get("idle_exit_s")
    sys.exit(event_loop.run(daemon.run()))


if __name__ == "__main__":
    main()
