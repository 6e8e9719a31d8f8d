"""The event loop every Tether process runs on: uvloop where it is installed, asyncio's otherwise.

A no-op task crosses six sockets and pipes (client, service, endpoint, worker and back), and on
each hop the loop's own Python (transports, handles, the selector) costs as much as Tether's
code. uvloop does that part in C: measured on two cores, the round trip's p50 fell by about a
sixth and the CPU per task with it (docs/benchmarks.md, 2026-12-06). It is installed with the
``service`` and ``endpoint`` extras on Linux and macOS; without it everything runs the same on
the standard loop. ``TETHER_EVENT_LOOP=asyncio`` chooses the standard loop anyway (to rule the
loop out when debugging, or to compare).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

#: the variable that picks the loop: ``uvloop`` (the default where installed) or ``asyncio``
ENV = "TETHER_EVENT_LOOP"


def _uvloop() -> Any | None:
    if os.environ.get(ENV, "").strip().lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop


def name() -> str:
    """``"uvloop"`` or ``"asyncio"``: what :func:`new_event_loop` makes (uvicorn's ``loop`` setting)."""
    return "uvloop" if _uvloop() is not None else "asyncio"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new loop of the chosen kind (for a thread that runs its own, like the client's)."""
    uvloop = _uvloop()
    return uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on a loop of the chosen kind."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)
