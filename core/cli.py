"""The ``tether`` command: who you are at a service (``login``, ``logout``, ``whoami``), its
dashboard, ``--version``; ``tether service ...`` (``service/cli.py``) and ``tether endpoint ...``
(``endpoint/cli.py``) are mounted from their own components.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Any

import typer

from tether.endpoint.cli import endpoint_app
from tether.service.cli import service_app

from .console import console, fail, report
from .errors import TetherError

app = typer.Typer(help="Tether: federated function execution for research computing.", no_args_is_help=True,
                  add_completion=False)
app.add_typer(service_app, name="service")
app.add_typer(endpoint_app, name="endpoint")


# --- identity ----------------------------------------------------------------------------
@app.command("login")
def login_command(
    service: str = typer.Option(..., help="the service URL"),
    globus_client_id: str = typer.Option(..., help="the Globus native app's client id (from the service's admin)"),
    scope: str = typer.Option(..., help="the service's Globus scope"),
    globus_auth_url: str = typer.Option(None, help="Globus Auth's base URL (default: production Globus Auth)"),
) -> None:
    """Log in with Globus Auth (native-app flow) for a service that accepts Globus tokens."""
    from .login import login

    def ask(url: str) -> str:
        console.print(f"Open this URL, log in, and paste the authorization code here:\n\n  {url}\n", highlight=False)
        return typer.prompt("Authorization code")

    try:
        data = login(service, globus_client_id, scope, ask, globus_auth_url)
    except TetherError as exc:
        fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - globus-sdk's errors: say what Globus said
        fail(f"Globus Auth refused the login: {exc}")
    console.print(f"logged in to {service} (token valid for {int(data['expires_at_seconds'] - time.time())} s, "
                  "refreshed automatically)")


@app.command("logout")
def logout_command(service: str = typer.Option(..., help="the service URL")) -> None:
    """Revoke and forget your Globus tokens for a service."""
    from .login import logout

    if not logout(service):
        fail(f"not logged in to {service}")
    console.print(f"logged out of {service}")


@app.command("dashboard")
def dashboard_command(
    service: str = typer.Option(None, help="the service URL (default: as the client finds it)"),
    open_browser: bool = typer.Option(False, "--open", help="open it in the default browser"),
) -> None:
    """Print a link to the service's dashboard that signs you in.

    Your token rides in the link's fragment, which a browser never sends to any server; treat
    the link as you treat the token."""
    from .config import find_service

    info = find_service(service, None)
    link = f"{info.url}/dashboard#token={info.token}"
    print(link)
    if open_browser:
        import webbrowser

        webbrowser.open(link)


@app.command("whoami")
def whoami_command(service: str = typer.Option(None, help="the service URL (default: as the client finds it)"),
                   as_json: bool = typer.Option(False, "--json", help="print as JSON")) -> None:
    """Who the service thinks you are."""
    from .client import Client

    with Client(service) as client:
        me = client.whoami()
    if as_json:
        print(json.dumps(me))
    else:
        console.print(f"{me['name']} ({me['user_id']}) at {client.info.url}", highlight=False)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        console.print(f"tether {__version__} (Python {sys.version.split()[0]})", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """Tether: federated function execution for research computing."""


def _no_flag_placeholders() -> None:
    """typer >= 0.20 shows a ``<bool>`` type beside every flag in --help, where nothing is to be
    typed; flags show none (other options keep their ``<int>``, ``<str>`` hints)."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


def main() -> None:
    with contextlib.suppress(ImportError, AttributeError):
        _no_flag_placeholders()
    try:
        app()
    except TetherError as exc:  # raised outside a command's own handling (the client's errors)
        report(str(exc))
        sys.exit(1)


if __name__ == "__main__":
    main()
