"""Main of a process-engine worker.

The worker leads its own process group (``setsid``), so killing the group on cancel or
walltime also kills anything the task started.

One thread does everything: before each task it takes whatever messages have already arrived
(so a queued task cancelled meanwhile is withdrawn before it ever starts) and it blocks on the
pipe only when it has nothing to run. A reader thread handing tasks to a runner thread cost
two thread wake-ups per task, which on a two-core machine was most of a no-op task's cost. A
small watcher thread, asleep nearly always, ends the worker when the endpoint daemon is gone
while a task runs.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from tether.endpoint.execute import Allowlist, TaskSpec, run_task
from tether.results import pack

#: seconds between the watcher's checks that the daemon still lives
PARENT_CHECK_S = 1.0

#: a task on the pipe: its number on this worker, then the fields of its TaskSpec in order (id,
#: function id, body or None when the worker has it, payload, spec, sandbox, inputs). Plain fields,
#: rebuilt here: pickling a TaskSpec looks its class up by name in every message, which cost the
#: daemon more per task than all the rest of the hand-over
TaskItem = tuple[int, str, str, bytes | None, bytes, dict[str, Any] | None, str | None, dict[str, bytes] | None]


def _exit_with_parent(parent: int) -> None:
    """The daemon died (SIGKILL, say) while a task runs: end as the pipe's EOF would have."""
    while True:
        time.sleep(PARENT_CHECK_S)
        if os.getppid() != parent:
            os._exit(0)


def main(conns: tuple[Connection, Connection], allowed_methods: Allowlist | frozenset[str] | None,
         engine_info: dict[str, Any] | None = None, python_sandbox: bool = False,
         gate: tuple[Any, Any, Any] | None = None, runner: Any = None) -> None:
    """Run tasks from ``conns[0]`` in order, sending results on ``conns[1]`` (as msgpack bytes). ``gate`` = (lock,
    started, floor) shared with the engine: a task numbered at or below ``floor`` is skipped (the
    engine gave it to another worker), and ``started`` tells the engine what was begun (see
    engines/process.py). ``runner``: runs each task elsewhere and returns its packed result (a
    :class:`~.container_worker.ContainerRunner`: the task runs in a container image)."""
    conn, results = conns
    try:
        os.setsid()
    except OSError:  # already a group leader
        pass
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), name="tether-worker-watcher",
                     daemon=True).start()
    if runner is not None:
        runner.start()
    queue: collections.deque[TaskItem] = collections.deque()
    # function bodies as they arrive, until loaded: the task that brought one may be skipped
    bodies: dict[str, bytes] = {}

    def take(msg: tuple[Any, ...]) -> None:
        if msg[0] == "tasks":
            for item in msg[1]:
                if item[3] is not None:
                    bodies[item[2]] = item[3]
            queue.extend(msg[1])
        elif msg[0] == "cancel":
            for item in list(queue):
                if item[1] == msg[1]:
                    queue.remove(item)
        elif msg[0] == "exit":
            os._exit(0)

    while True:
        try:
            while not queue or conn.poll():  # block only with nothing to run
                take(conn.recv())
        except (EOFError, OSError):
            os._exit(0)  # the endpoint is gone: so are we
        seq, task_id, fid, body, payload, spec, sandbox, inputs = queue.popleft()
        if gate is not None:
            lock, started, floor = gate
            with lock:
                withdrawn = seq <= floor.value
                if not withdrawn:
                    started.value = seq
            if withdrawn:
                continue
        # a body may have come earlier
        task = TaskSpec(task_id, fid, bodies.pop(fid, body), payload, spec, sandbox, inputs)
        if runner is None:
            results.send_bytes(pack(run_task(task, allowed_methods, chdir=python_sandbox, engine=engine_info)))
        else:
            results.send_bytes(runner(task))
