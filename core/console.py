"""How every ``tether`` command speaks: one console for output, one for errors, and failing
in words (an exit code, never a traceback). Shared by the commands of the core, the service and
the endpoint (``core/cli.py``, ``service/cli.py``, ``endpoint/cli.py``)."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

console = Console()
err = Console(stderr=True)


def report(message: str) -> None:
    """Say what is wrong (and how to fix it) on stderr."""
    err.print(f"[bold red]error:[/] {message}", highlight=False)


def fail(message: str, code: int = 1) -> NoReturn:
    """:func:`report`, and end the command with ``code``."""
    report(message)
    raise typer.Exit(code)


def need(extra: str, module: str) -> None:
    """Fail in words when an optional extra this command needs is not installed."""
    try:
        __import__(module)
    except ImportError as exc:
        fail(f"this command needs the '{extra}' extra: pip install 'tether[{extra}]' ({exc})")


__all__ = ["console", "err", "fail", "need", "report"]
