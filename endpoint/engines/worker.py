"""Main of a process-engine worker.

The worker leads its own process group (``setsid``), so killing the group on cancel or
walltime also kills anything the task started.

One thread does everything: before each task it takes whatever messages have already arrived
(so a queued task cancelled meanwhile is withdrawn before it ever starts) and it blocks on the
pipe only when it has nothing to run. A reader thread handing tasks to a runner thread cost
two thread wake-ups per task, which on a two-core machine was most of a no-op task's cost. A
small watcher thread, asleep nearly always, notices when the endpoint daemon is gone while a
task runs.

A worker outlives its daemon (see engines/adoption.py): when the daemon restarts (it signals
SIGUSR1) or dies (the watcher sees a new parent), the worker *detaches*: it begins no further
task, declares what it runs in its file beside the endpoint (``workers/PID.adopt``), and when that
task ends writes its result there too (``workers/PID.result``) for the next daemon, then exits.
The declaration is always written after any result sent on the pipe (both happen on the main
thread; the signal handler defers it while a result is being sent), so the daemon that waits for
it before exiting has read every result sent to it.
"""

from __future__ import annotations

import collections
import json
import os
import signal
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


class _Life:
    """What the main thread and the detach paths (signal handler, watcher) share. The handler
    runs on the main thread between bytecodes; the watcher's thread is ordered by the GIL."""

    def __init__(self, adopt_dir: str | None, lock: Any):
        self.adopt_dir = adopt_dir  # None: no daemon adopts this worker (it exits with the daemon)
        self.lock = lock  # held while a task begins, so a detach never misses one
        self.detached = False
        self.current: str | None = None  # the task running
        self.sending = False  # a result is on its way to the pipe: the declaration waits for it
        self.declare_pending = False

    def path(self, suffix: str) -> str:
        return os.path.join(self.adopt_dir or "", f"{os.getpid()}.{suffix}")

    def detach(self) -> None:
        """Begin nothing more; declare the running task (now, or once a result being sent is sent)."""
        if self.detached:
            return
        self.detached = True
        if self.sending:
            self.declare_pending = True
        else:
            self.declare()

    def declare(self) -> None:
        _write_atomic(self.path("adopt"), json.dumps({"pid": os.getpid(), "task": self.current}).encode())

    def keep(self, packed: bytes) -> None:
        """The result of the task that ran while the daemon was away: for the next one."""
        _write_atomic(self.path("result"), packed)


def _write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _watch_parent(parent: int, life: _Life) -> None:
    """The daemon died (SIGKILL, say) while a task runs: detach (or, with no daemon to adopt this
    worker, end as the pipe's EOF would have)."""
    while True:
        time.sleep(PARENT_CHECK_S)
        if os.getppid() != parent:
            if life.adopt_dir is None:
                os._exit(0)
            with life.lock:  # not while the main thread begins a task
                life.detach()
            return


def main(conns: tuple[Connection, Connection], allowed_methods: Allowlist | frozenset[str] | None,
         engine_info: dict[str, Any] | None = None, python_sandbox: bool = False,
         gate: tuple[Any, Any, Any] | None = None, runner: Any = None, adopt_dir: str | None = None) -> None:
    """Run tasks from ``conns[0]`` in order, sending results on ``conns[1]`` (as msgpack bytes). ``gate`` = (lock,
    started, floor) shared with the engine: a task numbered at or below ``floor`` is skipped (the
    engine gave it to another worker), and ``started`` tells the engine what was begun (see
    engines/process.py). ``runner``: runs each task elsewhere and returns its packed result (a
    :class:`~.container_worker.ContainerRunner`: the task runs in a container image). ``adopt_dir``:
    where this worker declares what it runs when its daemon goes away, so that the next one adopts
    it (see the module's docstring); None: it exits with the daemon."""
    conn, results = conns
    try:
        os.setsid()
    except OSError:  # already a group leader
        pass
    life = _Life(adopt_dir, gate[0] if gate is not None else threading.Lock())
    if adopt_dir is not None:
        signal.signal(signal.SIGUSR1, lambda *_: life.detach())  # the daemon restarts
    threading.Thread(target=_watch_parent, args=(os.getppid(), life), name="tether-worker-watcher",
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
        with life.lock:
            if life.detached:  # the daemon is gone: queued tasks are its service's to send again
                os._exit(0)
            withdrawn = False
            if gate is not None:
                withdrawn = seq <= gate[2].value
                if not withdrawn:
                    gate[1].value = seq
            life.current = task_id
        if withdrawn:
            continue
        # a body may have come earlier
        task = TaskSpec(task_id, fid, bodies.pop(fid, body), payload, spec, sandbox, inputs)
        if runner is None:
            packed = pack(run_task(task, allowed_methods, chdir=python_sandbox, engine=engine_info))
        else:
            packed = runner(task)
        _deliver(life, results, packed)


def _deliver(life: _Life, results: Connection, packed: bytes) -> None:
    """Send a result to the daemon, or keep it for the next one (see the module's docstring)."""
    life.sending = True
    if life.detached:
        life.keep(packed)
    else:
        try:
            results.send_bytes(packed)
        except OSError:  # the daemon died: the next one reads it
            if life.adopt_dir is None:
                os._exit(0)
            life.keep(packed)
            with life.lock:
                life.detach()
    life.current = None
    life.sending = False
    if life.declare_pending:
        life.declare_pending = False
        life.declare()
    if life.detached:
        os._exit(0)
