"""The process engine: a pool of worker processes on this host, with real cancellation.

Unlike ``concurrent.futures.ProcessPoolExecutor`` it knows which worker runs which task, so
``cancel`` can kill exactly that worker's process group (the task and its children) and start
a fresh worker, and a worker that dies fails only its own task, in words, never a hang.
Each worker holds one running task plus up to ``prefetch`` queued ones (8 by default), so it
never sleeps between short tasks: a worker woken for every task spent more on the wake-up than
on a no-op. Tasks go to a worker in one message however many there are.

A deep queue must not trap work behind a long task, so idle workers steal. Tasks are numbered
per worker, and each worker shares a gate with the engine: a lock and two counters in shared
memory, the number of the task it last began and a floor. A worker begins a task only if its
number is above the floor, and says so in ``started``, both under the lock. When a worker is
idle and nothing is queued here, the engine raises a loaded worker's floor to the last number
it handed out, under the lock, and gives the tasks numbered past ``started`` to others; the
loaded worker skips them when it comes to them. A task is begun by one worker, never two.

The daemon never blocks on a worker's pipe. Tasks travel on one pipe and results on another;
the daemon's end of the task pipe is non-blocking, and what a full pipe does not take waits in
a buffer, written as the pipe drains. With one blocking two-way pipe, a worker sending a large
result while the daemon sent it large arguments left each waiting on the other for ever.

Workers outlive a restarting or killed daemon, and the next one adopts what they run
(engines/adoption.py): ``detach`` instead of ``stop`` when the daemon restarts.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import logging
import multiprocessing
import os
import select
import signal
import struct
import time
from dataclasses import dataclass, field
from multiprocessing.reduction import ForkingPickler
from typing import Any

from tether.endpoint.container import process_worker_command
from tether.protocol import Result
from tether.results import cancelled, failure, unpack

from .adoption import Orphan, WorkerRecords, kill_group
from .base import Engine, TaskSpec
from .container_worker import ContainerRunner
from .worker import DETACHED, TaskItem, declare
from .worker import main as worker_main

log = logging.getLogger("tether.endpoint.process")

#: tasks queued on each worker beyond the running one, unless the config says otherwise
DEFAULT_PREFETCH = 8

#: bytes a task pipe holds before writes wait (Linux lets an unprivileged process ask for 1 MiB)
PIPE_BYTES = 1 << 20

#: seconds between looks at workers adopted from the previous daemon
POLL_ORPHANS_S = 0.2


def frame(message: Any, into: bytearray) -> None:
    """Append ``message`` to ``into`` as ``Connection.recv`` on the worker's end reads it: a
    pickle after its length (a 4-byte signed length, or -1 and an 8-byte one past 2 GiB)."""
    data = ForkingPickler.dumps(message)
    n = len(data)
    into += struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!iQ", -1, n)
    into += data


def task_pipe(fd: int) -> int:
    """``fd``, the daemon's end of a worker's task pipe, made non-blocking and large."""
    os.set_blocking(fd, False)
    try:  # fewer partial writes for large arguments; the default (64 KiB) works too
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (AttributeError, OSError):  # not Linux
        pass
    return fd


class WorkerLost(RuntimeError):
    """The worker process running a task died."""


@dataclass
class _Worker:
    proc: Any
    conn: Any  # results from the worker (a Connection, read when readable)
    tasks_fd: int  # tasks to the worker: a non-blocking pipe written through ``outbox``
    gate: Any  # a lock guarding the two counters below (see the module's docstring)
    started: Any  # shared: number of the last task the worker began
    floor: Any  # shared: the worker skips tasks numbered up to this (withdrawn from it)
    assigned: collections.deque = field(default_factory=collections.deque)  # TaskSpecs, in order
    seq: dict[str, int] = field(default_factory=dict)  # task id -> its number on this worker
    next_seq: int = 1
    functions: set[str] = field(default_factory=set)
    alive: bool = True
    outbox: bytearray = field(default_factory=bytearray)  # framed messages the pipe has not taken
    #: whether more results wait on ``conn``: one poll(2), where ``Connection.poll`` built a
    #: selector each time (two per result, on the daemon's loop)
    more: Any = None


class ProcessEngine(Engine):
    workers_read_blobs = True  # workers on this host: see Engine.workers_read_blobs

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.n_workers = int(self.config.get("workers", os.cpu_count() or 1))
        self.prefetch = int(self.config.get("prefetch", DEFAULT_PREFETCH))
        self.ctx = multiprocessing.get_context("spawn")  # never fork a process that runs threads
        self.queue: collections.deque[TaskSpec] = collections.deque()
        self.workers: list[_Worker] = []
        self.retries: dict[str, int] = {}
        self.stopping = False
        #: workers started in place of one killed (a running task cancelled) or dead, since start
        self.replaced = 0
        self.container_argv = process_worker_command(self.config)  # None: workers run on this host
        # in a container, workers may not reach the service (or see its CA): they read files
        self.workers_read_blobs = self.container_argv is None
        # workers left by a previous daemon (a restart): theirs run on; fresh ones fill the rest
        self.records = WorkerRecords(self.state_dir / "workers") if self.state_dir is not None else None
        self.orphans: list[Orphan] = []
        self.orphan_results: list[Result] = []
        if self.records is not None:
            self.orphans, self.orphan_results = await self.records.collect()
            if self.orphans or self.orphan_results:
                log.info("adopted %d running task(s) and %d result(s) from the previous daemon's workers",
                         len(self.orphans), len(self.orphan_results))
        for _ in range(max(0, self.n_workers - len(self.orphans))):
            self.workers.append(self._spawn())
        self._watching = asyncio.ensure_future(self._watch_orphans()) if self.orphans or self.orphan_results \
            else None

    def adopted(self) -> set[str]:
        return {o.task for o in self.orphans if o.task is not None} | {r.id for r in self.orphan_results}

    async def _watch_orphans(self) -> None:
        """Report adopted tasks' results as they come; a fresh worker replaces each adopted one."""
        results, self.orphan_results = self.orphan_results, []
        for result in results:
            self.on_result(result)
        while self.orphans and not self.stopping:
            await asyncio.sleep(POLL_ORPHANS_S)
            for orphan in list(self.orphans):
                result = self.records.ended(orphan) if self.records is not None else None
                if result is None:
                    continue
                self.orphans.remove(orphan)
                if not self.stopping:
                    self.on_result(result)
                    self.workers.append(self._spawn())
            self._assign()

    def _spawn(self) -> _Worker:
        worker = self._start_worker()
        self.loop.add_reader(worker.conn.fileno(), self._readable, worker)
        # read with Connection.recv, which needs a blocking pipe: a message larger than the pipe
        # arrives in parts. uvloop (libuv) makes a watched descriptor non-blocking, and a partial
        # read then raised BlockingIOError, which looked like a dead worker.
        os.set_blocking(worker.conn.fileno(), True)
        worker.more = select.poll()
        worker.more.register(worker.conn.fileno(), select.POLLIN)
        return worker

    def _start_worker(self) -> _Worker:
        """A new worker process (a multiprocessing child of this interpreter; see
        engines/environment_pool.py for workers in another)."""
        tasks_in, tasks_out = self.ctx.Pipe(duplex=False)
        results_in, results_out = self.ctx.Pipe(duplex=False)
        gate, started, floor = self.ctx.Lock(), self.ctx.RawValue("q", 0), self.ctx.RawValue("q", 0)
        runner = None if self.container_argv is None else ContainerRunner(
            self.container_argv, (self.allowed_methods, self.engine_info(), self.python_sandbox))
        # not a daemon process: tasks may start processes of their own (multiprocessing pools,
        # Parsl's resource monitor), which daemonic processes may not; a worker still ends with
        # the endpoint, when its pipe closes or stop() kills its group
        adopt_dir = None if self.records is None else str(self.records.dir)
        proc = self.ctx.Process(target=worker_main, args=((tasks_in, results_out), self.allowed_methods,
                                                           self.engine_info(), self.python_sandbox,
                                                           (gate, started, floor), runner, adopt_dir),
                                daemon=False, name="tether-worker")
        proc.start()
        if self.records is not None:
            self.records.record(proc.pid)
        tasks_in.close()  # the worker's ends: its death shows as EOF on ours, ours as EOF on its
        results_out.close()
        tasks_fd = os.dup(tasks_out.fileno())  # written by hand (frame, _flush), not by Connection
        tasks_out.close()
        return _Worker(proc, results_in, task_pipe(tasks_fd), gate, started, floor)

    async def stop(self) -> None:
        self.stopping = True
        for w in self.workers:
            self._kill(w)
        self.workers.clear()
        for orphan in self.orphans:  # a real stop ends the adopted tasks too
            kill_group(orphan.pid)
            if self.records is not None:
                self.records.forget(orphan.pid)
        self.orphans.clear()

    async def detach(self) -> None:
        """Leave the workers running for the next daemon (see engines/adoption.py): under each
        worker's lock its floor becomes DETACHED, so it begins nothing more and sends no result
        after; what it sent before is read here and reported, what it runs is declared for it,
        and the daemon exits without waiting for it."""
        if self.records is None:
            await self.stop()
            return
        self.stopping = True
        for w in [w for w in self.workers if w.alive]:
            for remove in (lambda w=w: self.loop.remove_reader(w.conn.fileno()),
                           lambda w=w: self.loop.remove_writer(w.tasks_fd)):
                try:
                    remove()
                except (ValueError, OSError):
                    pass
            # the worker holds its lock while it sends: read what it sends until it lets go (a
            # worker that died holding it never will, and needs no lock to be told anything)
            locked = w.gate.acquire(False)
            while not locked and w.proc.is_alive():
                self._read_all(w)
                await asyncio.sleep(0.001)
                locked = w.gate.acquire(False)
            try:
                w.floor.value = DETACHED
                started = w.started.value
            finally:
                if locked:
                    w.gate.release()
            self._read_all(w)
            running = next((t.id for t in w.assigned if w.seq.get(t.id) == started), None)
            declare(str(self.records.dir), w.proc.pid, running)
            w.alive = False
            w.conn.close()
            os.close(w.tasks_fd)
            multiprocessing.process._children.discard(w.proc)  # the daemon's exit must not wait for it
        self.workers.clear()

    def _read_all(self, w: _Worker) -> None:
        """Report the results ``w`` has sent (a frame begun is read whole: it is being written)."""
        try:
            while w.conn.poll():
                self._on_finished(w, unpack(w.conn.recv_bytes()))
        except (EOFError, OSError):
            pass

    def _kill(self, w: _Worker) -> None:
        if not w.alive:
            return
        w.alive = False
        if self.records is not None:
            self.records.forget(w.proc.pid)
        for remove in (lambda: self.loop.remove_reader(w.conn.fileno()),
                       lambda: self.loop.remove_writer(w.tasks_fd)):
            try:
                remove()
            except (ValueError, OSError):
                pass
        try:
            os.killpg(w.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            try:
                w.proc.kill()
            except Exception:  # noqa: BLE001
                pass
        w.proc.join(timeout=5)
        w.conn.close()
        w.outbox.clear()
        try:
            os.close(w.tasks_fd)
        except OSError:
            pass

    def _send(self, w: _Worker, message: Any) -> None:
        """Queue ``message`` for ``w`` and write what the pipe takes now; the rest is written
        when it drains (never blocking the daemon's loop, see the module's docstring)."""
        if not w.alive:  # its pipe is closed (and the number may belong to another file now)
            return
        pending = bool(w.outbox)
        frame(message, w.outbox)
        if not pending:
            self._flush(w)
            if w.outbox and w.alive:
                self.loop.add_writer(w.tasks_fd, self._drain, w)

    def _flush(self, w: _Worker) -> None:
        try:
            while w.outbox:
                written = os.write(w.tasks_fd, w.outbox)
                del w.outbox[:written]
        except BlockingIOError:
            pass
        except OSError:  # the worker is gone: its EOF on the result pipe says how
            w.outbox.clear()

    def _drain(self, w: _Worker) -> None:
        self._flush(w)
        if not w.outbox:
            self.loop.remove_writer(w.tasks_fd)

    # --- dispatch -----------------------------------------------------------------------------
    def submit(self, task: TaskSpec) -> None:
        self.queue.append(task)
        self._assign()

    def _assign(self) -> None:
        """Hand queued tasks to the least loaded workers, one message per worker however many
        tasks it gets (a message is a syscall and a wake-up of the worker)."""
        limit = 1 + self.prefetch
        batches: dict[int, list[TaskItem]] = {}
        while self.queue:
            worker = min((w for w in self.workers if w.alive), key=lambda w: len(w.assigned), default=None)
            if worker is None or len(worker.assigned) >= limit:
                break
            task = self.queue.popleft()
            body = None if task.function_id in worker.functions else task.function_body
            worker.functions.add(task.function_id)
            worker.assigned.append(task)
            seq = worker.seq[task.id] = worker.next_seq
            worker.next_seq += 1
            if len(worker.assigned) == 1:  # an idle worker starts it at once
                self.on_running(task.id, time.time())
            batches.setdefault(id(worker), []).append(
                (seq, task.id, task.function_id, body, task.payload, task.spec, task.sandbox, task.inputs))
        for worker in list(self.workers):
            batch = batches.get(id(worker))
            if batch is not None:
                self._send(worker, ("tasks", batch))
        if not self.queue:
            self._steal()

    def _steal(self) -> None:
        """An idle worker while another has tasks queued behind its running one: take those back
        (see the module's docstring) and hand them out again."""
        alive = [w for w in self.workers if w.alive]
        if not any(not w.assigned for w in alive):
            return
        victim = max(alive, key=lambda w: len(w.assigned))
        if len(victim.assigned) < 2:
            return
        withdrawn = self._withdraw(victim)
        if withdrawn is None:  # it is sending a result (see worker.py): try again soon
            self.loop.call_later(0.005, self._assign)
            return
        if withdrawn:
            self.queue.extendleft(reversed(withdrawn))
            self._assign()

    def _withdraw(self, w: _Worker) -> list[TaskSpec] | None:
        """Take back every task ``w`` holds and has not begun (it will skip them: its floor is
        raised under its lock), in order; None when that cannot be known without waiting on it:
        its lock is busy (it is sending a result, see worker.py), or it has none (a worker in
        another interpreter, engines/environment_pool.py)."""
        if w.gate is None or not w.gate.acquire(False):
            return None
        try:
            started = w.started.value
            w.floor.value = w.next_seq - 1  # it skips all it holds and has not begun
        finally:
            w.gate.release()
        withdrawn = [t for t in w.assigned if w.seq[t.id] > started]
        for t in withdrawn:
            w.assigned.remove(t)
            del w.seq[t.id]
        return withdrawn

    def _readable(self, w: _Worker) -> None:
        """The loop saw ``w``'s result pipe readable: read every result waiting there."""
        try:
            while w.alive:
                self._on_finished(w, unpack(w.conn.recv_bytes()))
                if not w.alive or not w.more.poll(0):
                    break
        except (EOFError, OSError):
            self._worker_died(w)
            return
        self._assign()

    def _on_finished(self, w: _Worker, result: Result) -> None:
        """A worker runs its assigned tasks in order, so when one ends the next one starts:
        that is when RUNNING is reported (saving the worker a message per task)."""
        tid = result.id
        w.seq.pop(tid, None)
        if w.assigned and w.assigned[0].id == tid:
            w.assigned.popleft()
            if w.assigned:
                self.on_running(w.assigned[0].id, time.time())
        else:  # cancelled while queued on the worker, raced with its start
            for t in list(w.assigned):
                if t.id == tid:
                    w.assigned.remove(t)
        self.retries.pop(tid, None)
        self.on_result(result)

    def _worker_died(self, w: _Worker) -> None:
        if not w.alive or self.stopping:
            return
        self._kill(w)
        code = w.proc.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        lost = w.assigned.popleft() if w.assigned else None  # the head was running
        for t in reversed(w.assigned):  # not started: simply run elsewhere
            self.queue.appendleft(t)
        if lost is not None:
            tries = self.retries.get(lost.id, 0)
            if tries < self.retries_on_worker_loss:
                self.retries[lost.id] = tries + 1
                log.warning("worker %s %s while running task %s; retrying it", w.proc.pid, how, lost.id)
                self.queue.appendleft(lost)
            else:
                self.retries.pop(lost.id, None)
                self.on_result(failure(lost.id, WorkerLost(
                    f"the worker process (pid {w.proc.pid}) {how} while running this task "
                    f"(out of memory, a crash in native code, or os._exit in the task?)"
                )))
        self._replace(w)
        self._assign()

    def _replace(self, w: _Worker) -> None:
        """Kill ``w`` (if it still runs) and start a fresh worker in its place."""
        self._kill(w)
        self.workers[self.workers.index(w)] = self._spawn()
        self.replaced += 1

    # --- cancellation -------------------------------------------------------------------------
    def cancel(self, task_id: str) -> None:
        now = time.time()
        for orphan in self.orphans:  # adopted from the previous daemon: its worker ends
            if orphan.task == task_id:
                self.orphans.remove(orphan)
                kill_group(orphan.pid)
                if self.records is not None:
                    self.records.forget(orphan.pid)
                self.on_result(cancelled(task_id, now))
                self.workers.append(self._spawn())
                self._assign()
                return
        for t in self.queue:
            if t.id == task_id:
                self.queue.remove(t)
                self.on_result(cancelled(task_id, now))
                return
        for w in self.workers:
            for t in w.assigned:
                if t.id != task_id:
                    continue
                if w.assigned[0].id == task_id:
                    withdrawn = self._withdraw(w)
                    if withdrawn and withdrawn[0].id == task_id:
                        # not begun yet (a worker just given it, or just started): it skips it and
                        # the rest it holds, which go back to the queue; no worker is killed
                        self.queue.extendleft(reversed(withdrawn[1:]))
                        self.on_result(cancelled(task_id, now))
                        self._assign()
                        return
                    if withdrawn:  # taken back from a worker that runs the task: queue them again
                        self.queue.extendleft(reversed(withdrawn))
                    # running: kill the process group, requeue the worker's other tasks
                    w.seq.pop(task_id, None)
                    w.assigned.remove(t)
                    for other in reversed(w.assigned):
                        self.queue.appendleft(other)
                    w.assigned.clear()
                    self._replace(w)
                else:
                    w.seq.pop(task_id, None)
                    w.assigned.remove(t)
                    self._send(w, ("cancel", task_id))
                self.on_result(cancelled(task_id, now))
                self._assign()
                return

    def capacity(self) -> dict[str, Any]:
        running = sum(1 for w in self.workers if w.alive and w.assigned) + len(self.orphans)
        return {
            "engine": "process",
            "workers_total": self.n_workers,
            "workers_idle": self.n_workers - running,
            "tasks_queued": len(self.queue) + sum(max(0, len(w.assigned) - 1) for w in self.workers),
            "tasks_running": running,
            "workers_replaced": self.replaced,
        }
