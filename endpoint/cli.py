"""``tether endpoint ...``: configure, start, stop and look at endpoints (multi-user ones too).
Mounted by the ``tether`` command (``core/cli.py``); command bodies import the endpoint's own
modules lazily, so a client-only install says which extra a command needs.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from rich.table import Table

from tether.console import console, fail, need
from tether.errors import TetherError
from tether.home import tether_home
from tether.ids import InvalidIdentifier, check_name

endpoint_app = typer.Typer(help="Configure and run endpoints.", no_args_is_help=True)


# --- endpoint -------------------------------------------------------------------------------
def _endpoint_name(name: str) -> str:
    """Checked as it enters: a name becomes a directory, so '..', 'a/b' or '/x' must never pass."""
    try:
        check_name(name)
    except InvalidIdentifier as exc:
        fail(f"{exc}; it names a directory under {tether_home() / 'endpoints'}")
    return name


EndpointName = Annotated[str, typer.Argument(callback=_endpoint_name, help="the endpoint's name", show_default=False)]


def _endpoint_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    need("endpoint", "tether.endpoint.manage")
    try:
        return fn(*args, **kwargs)
    except TetherError as exc:
        fail(str(exc))


@endpoint_app.command("configure")
def endpoint_configure(
    name: EndpointName,
    engine: str = typer.Option("process", help="thread | process | htex | mpi (Parsl; see docs/endpoint-admin.md)"),
    workers: int = typer.Option(None, help="tasks that run at once (default: CPU count)"),
    force: bool = typer.Option(False, help="overwrite an existing config.yaml"),
    multi_user: bool = typer.Option(False, "--multi-user", help="an endpoint that runs each user's tasks as their "
                                    "own local account (start it as root; see docs/multi-user.md)"),
) -> None:
    """Create $TETHER_HOME/endpoints/NAME/config.yaml (and, with --multi-user, the identity
    mapping, the user config template and its schema)."""
    from tether.endpoint import manage

    path = _endpoint_call(manage.configure, name, engine, workers, force, multi_user)
    extra = ""
    if multi_user:
        extra = ("\nedit identity_mapping.json, user_config_template.yaml.j2 and user_config_schema.json beside it; "
                 f"preview with: tether endpoint render-user-config {name} --user NAME --config '{{}}'")
    console.print(f"configured endpoint [bold]{name}[/]: {path}{extra}\nstart it with: tether endpoint start {name}")


@endpoint_app.command("render-user-config")
def endpoint_render_user_config(
    name: EndpointName,
    user: str = typer.Option(..., help="the identity's user name (as the service knows it)"),
    config: str = typer.Option("{}", help="the user_endpoint_config, as JSON"),
) -> None:
    """Show the config.yaml a multi-user endpoint would give USER's endpoint for CONFIG."""
    from tether.endpoint import manage

    try:
        values = json.loads(config)
    except ValueError as exc:
        fail(f"--config is not valid JSON: {exc}")
    if not isinstance(values, dict):
        fail("--config must be a JSON object, e.g. '{\"workers\": 2}'")
    print(_endpoint_call(manage.render_user_config, name, user, values), end="")


@endpoint_app.command("start")
def endpoint_start(
    name: EndpointName, detach: bool = typer.Option(False, "--detach", "-d", help="run in the background")
) -> None:
    """Register (once) and run the endpoint; prints its endpoint id."""
    from tether.endpoint import manage

    running = _endpoint_call(manage.daemon_pid, name)
    if running:
        fail(f"endpoint {name!r} is already running (pid {running}); 'tether endpoint stop {name}' stops it, "
              f"'tether endpoint restart {name}' restarts it in the background")
    cred = _endpoint_call(manage.ensure_registered, name)
    _endpoint_call(manage.apply_policy, name, cred)
    if detach:
        status = _endpoint_call(manage.start_detached, name)
        console.print(f"endpoint [bold]{name}[/] started (pid {status['pid']})")
        print(cred["endpoint_id"])
        return
    print(cred["endpoint_id"], flush=True)
    from tether.endpoint.run import run_daemon

    raise typer.Exit(_endpoint_call(run_daemon, name))


@endpoint_app.command("stop")
def endpoint_stop(name: EndpointName) -> None:
    """Stop a running endpoint: running tasks are killed (they run again at the next start);
    'restart' keeps them running."""
    from tether.endpoint import manage

    if _endpoint_call(manage.stop, name):
        console.print(f"stopped endpoint {name}")
    else:
        console.print(f"endpoint {name} was not running")


@endpoint_app.command("restart")
def endpoint_restart(name: EndpointName) -> None:
    """Stop, then start in the background. Running tasks keep running and the new daemon adopts
    them (process, htex and mpi engines; the thread engine's tasks are sent again); 'stop' ends them."""
    from tether.endpoint import manage

    _endpoint_call(manage.stop, name, keep_tasks=True)
    cred = _endpoint_call(manage.ensure_registered, name)
    _endpoint_call(manage.apply_policy, name, cred)
    status = _endpoint_call(manage.start_detached, name)
    console.print(f"endpoint [bold]{name}[/] restarted (pid {status['pid']})")
    print(cred["endpoint_id"])


@endpoint_app.command("list")
def endpoint_list(as_json: bool = typer.Option(False, "--json", help="print as JSON")) -> None:
    """Endpoints configured in this TETHER_HOME."""
    from tether.endpoint import manage

    rows = _endpoint_call(manage.list_endpoints)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("name", "endpoint id", "engine", "state", "pid")
    for r in rows:
        color = "green" if r["state"] == "connected" else "yellow" if r["pid"] else "dim"
        table.add_row(r["name"], r["endpoint_id"] or "(not registered)", str(r["engine"]),
                      f"[{color}]{r['state']}[/]", str(r["pid"] or ""))
    console.print(table)


@endpoint_app.command("status")
def endpoint_status(name: Annotated[str, typer.Argument(help="the endpoint's name, or its id", show_default=False)],
                    as_json: bool = typer.Option(False, "--json", help="print as JSON")) -> None:
    """Daemon state, capacity and versions, locally and as the service sees it."""
    from tether.endpoint import manage

    info = _endpoint_call(manage.status, name)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    svc = info.get("service") or {}
    cap = (svc.get("status") or {}).get("capacity") or info["local"].get("capacity") or {}
    ver = (svc.get("status") or {}).get("versions") or info["local"].get("versions") or {}
    table = Table(show_header=False)
    table.add_row("endpoint", f"{info.get('name') or name} ({info.get('endpoint_id', 'not registered')})")
    if info["running"] is None:
        table.add_row("daemon", "not configured in this TETHER_HOME")
    else:
        table.add_row("daemon", f"running, pid {info['pid']}" if info["running"] else "stopped")
    if "service" in info:
        table.add_row("service", "[green]online[/]" if svc.get("online") else "[red]offline[/]")
    elif "service_error" in info:
        table.add_row("service", f"[red]unreachable[/]: {info['service_error']}")
    for key in ("engine", "workers_total", "workers_idle", "tasks_queued", "tasks_running", "workers_replaced"):
        if key in cap:
            table.add_row(key.replace("_", " "), str(cap[key]))
    if info["local"]:
        table.add_row("results spooled", str(info["local"].get("spooled", 0)))
    if ver:
        table.add_row("versions", ", ".join(f"{k} {v}" for k, v in ver.items() if k != "platform"))
    container = info.get("container")
    if container:
        table.add_row("container", f"workers run in {container['type']} image {container['image'] or '(custom)'}")
    envs = info.get("environments")
    if envs and (envs["enabled"] or envs["cached"]):
        table.add_row("environments", f"{'on' if envs['enabled'] else 'off'}, {len(envs['cached'])} cached in "
                      f"{envs['cache_dir']}: {_mib(envs['total_bytes'])} of {_mib(envs['max_bytes'])}")
        for env in envs["cached"]:
            table.add_row(f"  {env['key']}", f"Python {env['python']} {' '.join(env['requirements'])}: "
                          f"{_mib(env['bytes'])}, built in {env['build_s']:.1f} s, last used "
                          f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(env['last_used']))}")
    console.print(table)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@endpoint_app.command("delete")
def endpoint_delete(name: EndpointName, yes: bool = typer.Option(False, "--yes", "-y", help="do not ask")) -> None:
    """Stop the endpoint, delete it from the service and remove its local state."""
    from tether.endpoint import manage

    if not yes and not typer.confirm(f"delete endpoint {name} and its local state?"):
        raise typer.Exit(1)
    _endpoint_call(manage.delete, name)
    console.print(f"deleted endpoint {name}")


@endpoint_app.command("rotate-credential")
def endpoint_rotate_credential(name: str) -> None:
    """Replace the endpoint's credential with a new one: the old one stops working at once and a
    running endpoint reconnects with the new one."""
    from tether.endpoint import manage

    cred = _endpoint_call(manage.rotate_credential, name)
    console.print(f"endpoint [bold]{name}[/] ({cred['endpoint_id']}) has a new credential; the old one is void")


@endpoint_app.command("show-config-schema")
def endpoint_show_config_schema(
    endpoint_id: Annotated[str, typer.Argument(help="the multi-user endpoint's id", show_default=False)],
) -> None:
    """What you may pass as user_endpoint_config to a multi-user endpoint: its administrator's JSON
    Schema and the variables its template uses (printed as JSON)."""
    from tether.client import Client

    try:
        with Client() as client:
            print(json.dumps(client.endpoint_user_config_schema(endpoint_id), indent=2))
    except TetherError as exc:
        fail(str(exc))


@endpoint_app.command("diagnose")
def endpoint_diagnose(
    name: EndpointName,
    output: str = typer.Option(None, "--output", "-o", help="where to write the bundle (default: "
                               "./tether-diagnose-NAME-TIME.tar.gz)"),
) -> None:
    """Write a bundle for whoever supports you: the endpoint's configuration and the end of its
    logs (secrets removed, the credential left out), versions, and whether the service answers."""
    from pathlib import Path

    need("endpoint", "tether.endpoint.diagnose")
    from tether.endpoint import diagnose

    path = _endpoint_call(diagnose.bundle, name, Path(output) if output else None)
    reach = json.loads(diagnose.connectivity_summary(path))
    console.print(f"wrote [bold]{path}[/] (mode 0600; no credential or token in it)")
    console.print("service: " + ("[green]reachable[/]" if reach.get("ok") else f"[red]not reachable[/]: "
                                                                              f"{reach.get('error', reach)}"))


__all__ = ["endpoint_app"]
