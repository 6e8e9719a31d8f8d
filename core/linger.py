"""When to send what has gathered: the one batching rule of the client, the service and the endpoint.

Every frame costs a syscall on each side and, at the service, a commit; a frame per task capped
throughput at a fraction of what the same work costs in frames of hundreds. But a task nobody
else travels with must not wait. So, like Nagle's algorithm in time instead of bytes:

* **eager** (``Linger(send, window)``): send at once when the line was quiet (nothing else in
  flight, or the last send was more than ``window`` ago); while a burst streams, send at most
  once per ``window``, gathering what arrives meanwhile. The client's submissions and the
  endpoint's results go this way: a lone task's round trip never waits.
* **patient** (``eager=False``): send ``window`` after the first item, whatever else happens.
  News nobody waits on goes this way (the service's acknowledgements and state changes): a
  burst of it becomes one frame.

``send`` is called on the event loop, with nothing: it takes what has gathered itself.

The armed send's due time is kept here, not asked of its handle: uvloop returns a plain
``Handle`` (no ``when()``) for a timer due in under a millisecond, so a poke just after such an
arming raised ``AttributeError`` in whatever called it: an endpoint's engine callback then
skipped handing queued tasks to its idle workers, or its link dropped in the middle of a cancel
frame (tests/test_cancel_races.py's flake).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Linger:
    def __init__(self, send: Callable[[], None], window: float, eager: bool = True):
        self._send = send
        self.window = window
        self.eager = eager
        self._last = float("-inf")  # loop time of the last send
        self._handle: asyncio.Handle | None = None
        self._due = float("-inf")  # loop time the armed send is due at

    def poke(self, busy: bool = True, window: float | None = None) -> None:
        """Something gathered: send it now or arm the send (``busy``: other work is in flight, so
        more may come to travel with it; ``window`` overrides the default for this burst).
        Call on the loop."""
        loop = asyncio.get_running_loop()
        window = self.window if window is None else window
        now = loop.time()
        if not self.eager:
            if self._handle is None:
                self._arm(loop, now + window)
            return
        delay = window - (now - self._last) if busy else 0.0
        if self._handle is not None:
            if delay > 0 or self._due <= now:
                return  # the armed send takes this too
            self._handle.cancel()  # the burst is over: what lingers goes now
            self._handle = None
        if delay > 0:
            self._arm(loop, now + delay)
        else:
            self.sent()
            self._send()

    def _arm(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        self._due = due
        self._handle = loop.call_at(due, self._fire)

    def sent(self) -> None:
        """A send happened (here, or by a caller that flushed on its own): the window starts now."""
        self._last = asyncio.get_running_loop().time()

    def cancel(self) -> None:
        """Forget the armed send (what gathered stays where it is, for the caller to flush)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        self.sent()
        self._send()
