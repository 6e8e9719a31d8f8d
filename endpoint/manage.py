"""What ``tether endpoint ...`` does: configure, register, start/stop daemons, report status.

The daemon runs as ``python -m tether.endpoint.run NAME`` (no dependence on a console
script being on PATH); ``daemon.pid`` and ``status.json`` in the endpoint's directory tell
the CLI what it is doing. A pid from ``daemon.pid`` is signalled only after checking that it
still is that daemon (see :func:`tether.processes.is_recorded_process`).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tether.client import Client
from tether.errors import ConfigError, TetherError
from tether.home import tether_home, write_secret
from tether.ids import check_name
from tether.processes import endpoint_commands, is_recorded_process, signal_and_wait

from .config import endpoint_dir, load_config, write_default_config
from .container import engine_container
from .environments import cached_environments


def configure(name: str, engine: str = "process", workers: int | None = None, force: bool = False,
              multi_user: bool = False) -> Path:
    path = endpoint_dir(name) / "config.yaml"
    if path.exists() and not force:
        raise ConfigError(f"endpoint {name!r} is already configured ({path}); edit it, or pass --force to overwrite")
    if multi_user:
        return write_multi_user_config(name)
    return write_default_config(name, engine, workers)


def write_multi_user_config(name: str) -> Path:
    """config.yaml plus the three files an administrator edits: identity mapping, user config
    template and its schema (all 0600: they say who runs as whom)."""
    from .identity import DEFAULT_MAPPING
    from .user_config import DEFAULT_SCHEMA, DEFAULT_TEMPLATE

    d = endpoint_dir(name)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = {
        "config.yaml": f"""# Tether multi-user endpoint {name!r}. Reference: docs/multi-user.md
multi_user: true
allowed_users: ["*"]           # who may send tasks: "*" (every user of the service) or user names/ids
identity_mapping: identity_mapping.json         # identity -> local account (globus-identity-mapping rules)
user_config_template: user_config_template.yaml.j2   # each user endpoint's config.yaml
user_config_schema: user_config_schema.json     # what users may put in user_endpoint_config
min_uid: 1000                  # accounts under this uid (and root) are refused
max_uid: 60000                 # accounts above it (nobody, nfsnobody) are refused too
allow_nologin_shells: false    # accounts whose shell is nologin or false are refused
idle_timeout_s: 600            # a user endpoint with no task for this long stops (restarted on demand)
max_user_endpoints_per_user: 8 # running at once for one user (one per distinct user_endpoint_config)
audit_log: audit.log
user_log_max_bytes: 16777216   # each user endpoint's output (user_endpoints/ID.log): rotated past this
user_log_bytes_per_s: 1048576  # read at most this fast on average; a user printing faster waits on their own output
heartbeat_s: 5
""",
        "identity_mapping.json": json.dumps(DEFAULT_MAPPING, indent=2) + "\n",
        "user_config_template.yaml.j2": DEFAULT_TEMPLATE,
        "user_config_schema.json": json.dumps(DEFAULT_SCHEMA, indent=2) + "\n",
    }
    for filename, text in files.items():
        write_secret(d / filename, text)
    return d / "config.yaml"


def render_user_config(name: str, user: str, values: dict[str, Any], identity_id: str | None = None) -> str:
    """What a user endpoint's config.yaml would be for ``user`` with ``values`` (for checking a
    template and schema before users hit them). Raises ConfigError in words."""
    from .identity import IdentityMapper, MappingRefused
    from .user_config import UserConfigRefused, user_endpoint_config

    config = load_config(name)
    if not config.multi_user:
        raise ConfigError(f"endpoint {name!r} is not a multi-user endpoint")
    identity = {"id": identity_id or user, "username": user}
    try:
        account = IdentityMapper(config.dir / config.identity_mapping, config.min_uid, config.max_uid,
                                 config.allow_nologin_shells).local_account(identity)
        text, _ = user_endpoint_config(config.dir, config.user_config_template, config.user_config_schema, values,
                                       account, identity, name, f"u-{name}")
    except (MappingRefused, UserConfigRefused) as exc:
        raise ConfigError(str(exc)) from None
    return text


def credential_path(name: str) -> Path:
    return endpoint_dir(name) / "credential.json"


def ensure_registered(name: str, service: str | None = None, token: str | None = None) -> dict[str, str]:
    """Register with the service using the owner's token, once; keep the endpoint's own credential."""
    load_config(name)  # a broken config is reported before anything else happens
    client = Client(service, token)
    path = credential_path(name)
    previous: dict[str, str] = {}
    if path.exists():
        previous = json.loads(path.read_text())
        if previous.get("service_url") == client.info.url:
            return previous
    with client:  # a new service: a new endpoint there (ids are the service's to issue)
        reg = client.register_endpoint(name, multi_user=load_config(name).multi_user)
    cred = {"endpoint_id": reg["endpoint_id"], "secret": reg["secret"], "service_url": client.info.url,
            "ca_file": client.info.ca_file}
    write_secret(path, json.dumps(cred))
    return cred


def apply_policy(name: str, cred: dict[str, str]) -> None:
    """Tell the service who may use the endpoint: for a multi-user one, ``allowed_users`` (and
    what they may pass); for any, its ``authentication_policy``. Sent at every start."""
    config = load_config(name)
    authentication = config.authentication_policy or None
    if not config.multi_user:  # sent even when there is none: one taken out of config.yaml goes
        with Client(cred["service_url"]) as client:
            client.set_endpoint_policy(cred["endpoint_id"], authentication=authentication)
        return
    from .user_config import template_variables

    users = [u for u in config.allowed_users if u != "*"]
    # what users may pass, so they can read it before a task fails (tether endpoint show-config-schema)
    schema_file, template_file = config.dir / config.user_config_schema, config.dir / config.user_config_template
    schema = json.loads(schema_file.read_text()) if schema_file.exists() else None
    variables = template_variables(template_file.read_text()) if template_file.exists() else []
    with Client(cred["service_url"]) as client:
        client.set_endpoint_policy(cred["endpoint_id"], public="*" in config.allowed_users, users=users,
                                   user_config_schema=schema, user_config_variables=variables,
                                   authentication=authentication)


def rotate_credential(name: str) -> dict[str, str]:
    """Get a new credential for a registered endpoint and store it (0600). The service voids the
    old one at once; a running daemon is disconnected, rereads the file and reconnects."""
    path = credential_path(name)
    if not path.exists():
        raise ConfigError(f"endpoint {name!r} is not registered yet: run 'tether endpoint start {name}' first")
    previous = json.loads(path.read_text())
    with Client(previous["service_url"]) as client:
        reg = client.register_endpoint(name, previous["endpoint_id"])
    cred = {**previous, "secret": reg["secret"]}
    write_secret(path, json.dumps(cred))
    return cred


def daemon_pid(name: str) -> int | None:
    """PID of the running daemon, or None.

    A pid file whose process is gone, or whose pid now belongs to another process (the daemon
    was killed and the pid reused), is stale: it is removed, and that process is never signalled.
    """
    path = endpoint_dir(name) / "daemon.pid"
    try:
        text = path.read_text()
        pid = int(text)
        written = path.stat().st_mtime
    except (OSError, ValueError):
        return None
    if is_recorded_process(pid, endpoint_commands(check_name(name)), written):
        return pid
    try:  # stale; remove it unless a daemon starting right now has just rewritten it
        if path.read_text() == text:
            path.unlink()
    except OSError:
        pass
    return None


def local_status(name: str) -> dict[str, Any]:
    try:
        return json.loads((endpoint_dir(name) / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def start_detached(name: str, timeout: float = 60.0) -> dict[str, Any]:
    """Start the daemon in the background and wait until it is connected to the service."""
    if daemon_pid(name):
        raise TetherError(f"endpoint {name!r} is already running (pid {daemon_pid(name)})")
    d = endpoint_dir(name)
    log_path = d / "endpoint.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tether.endpoint.run", name],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = local_status(name)
        if status.get("pid") == proc.pid and status.get("state") == "connected":
            return status
        code = proc.poll()
        if code is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            raise TetherError(f"endpoint {name!r} exited with code {code}; last lines of {log_path}:\n  "
                              + "\n  ".join(tail))
        time.sleep(0.05)
    raise TetherError(f"endpoint {name!r} (pid {proc.pid}) did not connect to the service within {timeout:.0f}s; "
                      f"see {log_path}")


def stop(name: str, timeout: float = 20.0, keep_tasks: bool = False) -> bool:
    """SIGTERM the daemon and wait for it to exit (SIGKILL after ``timeout``). False if not running.

    ``keep_tasks`` (a restart): SIGUSR1 instead, and the daemon exits leaving its running tasks
    running, for the next daemon to adopt (engines/adoption.py); what they would lose if it had
    to be killed, they lose no more than from a crash (they are adopted the same way)."""
    if not (endpoint_dir(name) / "config.yaml").exists():
        raise ConfigError(f"no endpoint named {name!r} under {tether_home() / 'endpoints'}; "
                          "'tether endpoint list' shows those configured here")
    pid = daemon_pid(name)
    if pid is not None and not signal_and_wait(pid, signal.SIGUSR1 if keep_tasks else signal.SIGTERM, timeout):
        signal_and_wait(pid, signal.SIGKILL, 5)
    # the htex/mpi engine host a killed daemon left (engines/parsl/hosted.py) ends with a real stop
    host = False if keep_tasks else _end_engine_host(endpoint_dir(name))
    return pid is not None or host


def _end_engine_host(directory: Path) -> bool:
    if not (directory / "engine-host.lock").exists():  # never had one: Parsl need not be imported
        return False
    from .engines.parsl.hosted import end_orphaned_host

    return end_orphaned_host(directory)


def list_endpoints() -> list[dict[str, Any]]:
    root = tether_home() / "endpoints"
    out = []
    for d in sorted(root.iterdir()) if root.exists() else []:
        name = d.name
        if not (d / "config.yaml").exists() or not _valid_name(name):
            continue  # not made by 'tether endpoint configure'
        try:
            engine = load_config(name).engine.get("type")
        except ConfigError:
            engine = "(invalid config)"
        cred = json.loads((d / "credential.json").read_text()) if (d / "credential.json").exists() else {}
        pid = daemon_pid(name)
        status = local_status(name)
        out.append({
            "name": name,
            "endpoint_id": cred.get("endpoint_id"),
            "engine": engine,
            "state": (status.get("state") or "running") if pid else "stopped",
            "pid": pid,
        })
    return out


def _valid_name(name: str) -> bool:
    try:
        check_name(name)
    except TetherError:
        return False
    return True


def status(name: str) -> dict[str, Any]:
    """Local view (daemon, spool, capacity) merged with the service's view when reachable.
    ``name`` may also be an endpoint id (one configured here, or any the service shows you)."""
    if not (endpoint_dir(name) / "config.yaml").exists():
        local = next((r["name"] for r in list_endpoints() if r["endpoint_id"] == name), None)
        if local is not None:
            return status(local)
        if _is_uuid(name):
            with Client() as client:
                service = client.get_endpoint_status(name)
            return {"name": service.get("name"), "endpoint_id": name, "running": None, "pid": None, "local": {},
                    "service": service}
        raise ConfigError(f"no endpoint named {name!r} under {tether_home() / 'endpoints'}; "
                          "'tether endpoint list' shows those configured here (an endpoint id works too)")
    pid = daemon_pid(name)
    local = local_status(name) if pid else {}
    info: dict[str, Any] = {"name": name, "running": pid is not None, "pid": pid, "local": local}
    config = load_config(name)
    info["environments"] = cached_environments(config)
    container = engine_container(config.engine)
    info["container"] = None if container is None else {"type": container.type, "image": container.image}
    cred_file = credential_path(name)
    if cred_file.exists():
        cred = json.loads(cred_file.read_text())
        info["endpoint_id"] = cred["endpoint_id"]
        try:
            with Client(cred["service_url"]) as client:
                info["service"] = client.get_endpoint_status(cred["endpoint_id"])
        except (TetherError, ConfigError) as exc:
            info["service_error"] = str(exc)
    return info


def _is_uuid(text: str) -> bool:
    import uuid

    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def delete(name: str) -> None:
    d = endpoint_dir(name)
    if not d.exists():
        raise ConfigError(f"no endpoint named {name!r} under {tether_home() / 'endpoints'}")
    stop(name)
    cred_file = credential_path(name)
    if cred_file.exists():
        cred = json.loads(cred_file.read_text())
        try:
            with Client(cred["service_url"]) as client:
                client.delete_endpoint(cred["endpoint_id"])
        except (TetherError, ConfigError):
            pass  # the service may be gone; the local state goes regardless
    shutil.rmtree(d)
