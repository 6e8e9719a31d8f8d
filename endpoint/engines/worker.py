"""Main of a process-engine worker.

The worker leads its own process group (``setsid``), so killing the group on cancel or
walltime also kills anything the task started. A reader thread keeps taking messages while a
task runs, so a queued task can be withdrawn (cancelled) before it ever starts.
"""

from __future__ import annotations

import collections
import os
import threading
from multiprocessing.connection import Connection
from typing import Any

from tether.endpoint.execute import run_task


def main(conn: Connection, allowed_methods: frozenset[str] | None, engine_info: dict[str, Any] | None = None,
         python_sandbox: bool = False) -> None:
    try:
        os.setsid()
    except OSError:  # already a group leader
        pass
    queue: collections.deque[tuple[Any, ...]] = collections.deque()
    ready = threading.Condition()

    def reader() -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                os._exit(0)  # the endpoint is gone: so are we
            if msg[0] == "task":
                with ready:
                    queue.append(msg)
                    ready.notify()
            elif msg[0] == "cancel":
                with ready:
                    for item in list(queue):
                        if item[1] == msg[1]:
                            queue.remove(item)
            elif msg[0] == "exit":
                os._exit(0)

    threading.Thread(target=reader, name="tether-worker-reader", daemon=True).start()
    while True:
        with ready:
            while not queue:
                ready.wait()
            _, task_id, fid, body, payload, sandbox, spec = queue.popleft()
        conn.send(("result", run_task(task_id, fid, body, payload, sandbox, allowed_methods,
                                      chdir=python_sandbox, spec=spec, engine=engine_info)))
