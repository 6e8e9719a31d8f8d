"""Main of a process-engine worker.

The worker leads its own process group (``setsid``), so killing the group on cancel or
walltime also kills anything the task started.

One thread does everything: before each task it takes whatever messages have already arrived
(so a queued task cancelled meanwhile is withdrawn before it ever starts) and it blocks on the
pipe only when it has nothing to run. A reader thread handing tasks to a runner thread cost
two thread wake-ups per task, which on a two-core machine was most of a no-op task's cost. A
small watcher thread, asleep nearly always, notices when the endpoint daemon is gone while a
task runs.

A worker outlives its daemon (see engines/adoption.py). It sends each result holding its gate's
lock, and begins no task once the floor says ``DETACHED``: a restarting daemon sets that under
the lock, so every result sent before is whole in the pipe, where it reads it, and none is sent
after. When the daemon dies instead (SIGKILL), the watcher sets it and says what runs. Either
way the running task ends in this process, its result goes to ``workers/PID.result`` for the
next daemon, and the worker exits. Nothing here waits for a signal handler, which a task busy in
native code would hold off.
"""

from __future__ import annotations

import collections
import json
import os
import select
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


#: the floor of a worker whose daemon is gone: it begins nothing more, and keeps its result
DETACHED = 1 << 62


def declare(adopt_dir: str, pid: int, task: str | None) -> None:
    """Say what worker ``pid`` runs (``task``, or None: nothing), for the next daemon."""
    write_atomic(os.path.join(adopt_dir, f"{pid}.adopt"), json.dumps({"pid": pid, "task": task}).encode())


def write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class _Running:
    """The task this worker runs (set and read under the gate's lock: the watcher reads it)."""

    task: str | None = None


def _watch_parent(parent: int, gate: tuple[Any, Any, Any] | None, adopt_dir: str | None,
                  running: _Running) -> None:
    """The daemon died (SIGKILL, say) while a task runs: detach and say what runs (or, with no
    daemon to adopt this worker, end as the pipe's EOF would have)."""
    while True:
        time.sleep(PARENT_CHECK_S)
        if os.getppid() == parent:
            continue
        if gate is None or adopt_dir is None:
            os._exit(0)
        lock, _, floor = gate
        with lock:
            if floor.value != DETACHED:  # (a restarting daemon has said it already)
                floor.value = DETACHED
                declare(adopt_dir, os.getpid(), running.task)
        return


def main(conns: tuple[Connection, Connection], allowed_methods: Allowlist | frozenset[str] | None,
         engine_info: dict[str, Any] | None = None, python_sandbox: bool = False,
         gate: tuple[Any, Any, Any] | None = None, runner: Any = None, adopt_dir: str | None = None) -> None:
    """Run tasks from ``conns[0]`` in order, sending results on ``conns[1]`` (as msgpack bytes). ``gate`` = (lock,
    started, floor) shared with the engine: a task numbered at or below ``floor`` is skipped (the
    engine gave it to another worker), and ``started`` tells the engine what was begun (see
    engines/process.py). ``runner``: runs each task elsewhere and returns its packed result (a
    :class:`~.container_worker.ContainerRunner`: the task runs in a container image). ``adopt_dir``:
    where this worker leaves its result when its daemon is gone, for the next one (see the
    module's docstring); None: it exits with the daemon."""
    conn, results = conns
    try:
        os.setsid()
    except OSError:  # already a group leader
        pass
    running = _Running()
    threading.Thread(target=_watch_parent, args=(os.getppid(), gate, adopt_dir, running),
                     name="tether-worker-watcher", daemon=True).start()
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

    # whether more tasks wait on the pipe: one poll(2) (Connection.poll builds a selector each time)
    more = select.poll()
    more.register(conn.fileno(), select.POLLIN)
    while True:
        try:
            while not queue or more.poll(0):  # block only with nothing to run
                take(conn.recv())
        except (EOFError, OSError):
            os._exit(0)  # the endpoint is gone: so are we
        seq, task_id, fid, body, payload, spec, sandbox, inputs = queue.popleft()
        if gate is not None:
            lock, started, floor = gate
            with lock:
                if floor.value == DETACHED:  # the daemon is gone: queued tasks are the service's to resend
                    os._exit(0)
                withdrawn = seq <= floor.value
                if not withdrawn:
                    started.value = seq
                    running.task = task_id
            if withdrawn:
                continue
        # a body may have come earlier
        task = TaskSpec(task_id, fid, bodies.pop(fid, body), payload, spec, sandbox, inputs)
        if runner is None:
            packed = pack(run_task(task, allowed_methods, chdir=python_sandbox, engine=engine_info))
        else:
            packed = runner(task)
        if gate is None or adopt_dir is None:
            results.send_bytes(packed)
            continue
        with gate[0]:  # see the module's docstring
            running.task = None
            undeclared = False
            if gate[2].value != DETACHED:
                try:
                    results.send_bytes(packed)
                    continue
                except OSError:  # the daemon died before the watcher noticed
                    gate[2].value = DETACHED
                    undeclared = True
            write_atomic(os.path.join(adopt_dir, f"{os.getpid()}.result"), packed)
            if undeclared:  # after the result: a declaration of nothing lets the next daemon forget this one
                declare(adopt_dir, os.getpid(), None)
        os._exit(0)
