"""The process engine: a pool of worker processes on this host, with real cancellation.

Unlike ``concurrent.futures.ProcessPoolExecutor`` it knows which worker runs which task, so
``cancel`` can kill exactly that worker's process group (the task and its children) and start
a fresh worker, and a worker that dies fails only its own task, in words, never a hang.
Each worker holds one running task plus ``prefetch`` queued ones, so it never idles waiting
for the next message.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from tether.endpoint.execute import failure

from .base import Engine, TaskSpec, cancelled_record
from .worker import main as worker_main

log = logging.getLogger("tether.endpoint.process")


class WorkerLost(RuntimeError):
    """The worker process running a task died."""


@dataclass
class _Worker:
    proc: Any
    conn: Any
    assigned: collections.deque = field(default_factory=collections.deque)  # TaskSpecs, in order
    functions: set[str] = field(default_factory=set)
    alive: bool = True


class ProcessEngine(Engine):
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.n_workers = int(self.config.get("workers", os.cpu_count() or 1))
        self.prefetch = int(self.config.get("prefetch", 1))
        self.ctx = multiprocessing.get_context("spawn")  # never fork a process that runs threads
        self.queue: collections.deque[TaskSpec] = collections.deque()
        self.workers: list[_Worker] = []
        self.retries: dict[str, int] = {}
        self.stopping = False
        for _ in range(self.n_workers):
            self.workers.append(self._spawn())

    def _spawn(self) -> _Worker:
        parent, child = self.ctx.Pipe()
        # not a daemon process: tasks may start processes of their own (multiprocessing pools,
        # Parsl's resource monitor), which daemonic processes may not; a worker still ends with
        # the endpoint, when its pipe closes or stop() kills its group
        proc = self.ctx.Process(target=worker_main, args=(child, self.allowed_methods, self.engine_info(),
                                                           self.python_sandbox), daemon=False,
                                name="tether-worker")
        proc.start()
        child.close()  # so the worker's death shows as EOF on our end
        worker = _Worker(proc, parent)
        self.loop.add_reader(parent.fileno(), self._readable, worker)
        return worker

    async def stop(self) -> None:
        self.stopping = True
        for w in self.workers:
            self._kill(w)
        self.workers.clear()

    def _kill(self, w: _Worker) -> None:
        if not w.alive:
            return
        w.alive = False
        try:
            self.loop.remove_reader(w.conn.fileno())
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

    # --- dispatch -----------------------------------------------------------------------------
    def submit(self, task: TaskSpec) -> None:
        self.queue.append(task)
        self._assign()

    def _assign(self) -> None:
        limit = 1 + self.prefetch
        while self.queue:
            worker = min((w for w in self.workers if w.alive), key=lambda w: len(w.assigned), default=None)
            if worker is None or len(worker.assigned) >= limit:
                return
            task = self.queue.popleft()
            body = None if task.function_id in worker.functions else task.function_body
            worker.functions.add(task.function_id)
            worker.assigned.append(task)
            if len(worker.assigned) == 1:  # an idle worker starts it at once
                self.on_running(task.id, time.time())
            try:
                worker.conn.send(("task", task.id, task.function_id, body, task.payload, str(task.sandbox), task.spec))
            except (OSError, ValueError):
                self._worker_died(worker)

    def _readable(self, w: _Worker) -> None:
        try:
            while w.alive and w.conn.poll():
                self._on_finished(w, w.conn.recv()[1])
        except (EOFError, OSError):
            self._worker_died(w)
            return
        self._assign()

    def _on_finished(self, w: _Worker, result: dict[str, Any]) -> None:
        """A worker runs its assigned tasks in order, so when one ends the next one starts:
        that is when RUNNING is reported (saving the worker a message per task)."""
        if w.assigned and w.assigned[0].id == result["id"]:
            w.assigned.popleft()
            if w.assigned:
                self.on_running(w.assigned[0].id, time.time())
        else:  # cancelled while queued on the worker, raced with its start
            for t in list(w.assigned):
                if t.id == result["id"]:
                    w.assigned.remove(t)
        self.retries.pop(result["id"], None)
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
        self.workers[self.workers.index(w)] = self._spawn()
        self._assign()

    # --- cancellation -------------------------------------------------------------------------
    def cancel(self, task_id: str) -> None:
        now = time.time()
        for t in self.queue:
            if t.id == task_id:
                self.queue.remove(t)
                self.on_result(cancelled_record(task_id, now))
                return
        for w in self.workers:
            for t in w.assigned:
                if t.id != task_id:
                    continue
                if w.assigned[0].id == task_id:
                    # running (or about to): kill the process group, requeue the worker's other tasks
                    w.assigned.remove(t)
                    for other in reversed(w.assigned):
                        self.queue.appendleft(other)
                    w.assigned.clear()
                    self._kill(w)
                    self.workers[self.workers.index(w)] = self._spawn()
                else:
                    w.assigned.remove(t)
                    try:
                        w.conn.send(("cancel", task_id))
                    except (OSError, ValueError):
                        pass
                self.on_result(cancelled_record(task_id, now))
                self._assign()
                return

    def capacity(self) -> dict[str, Any]:
        running = sum(1 for w in self.workers if w.alive and w.assigned)
        return {
            "engine": "process",
            "workers_total": self.n_workers,
            "workers_idle": self.n_workers - running,
            "tasks_queued": len(self.queue) + sum(max(0, len(w.assigned) - 1) for w in self.workers),
            "tasks_running": running,
        }
