"""The thread engine: tasks run in a thread pool inside the endpoint process.

Cheapest per task, but a running Python function cannot be killed (threads cannot be), so
``cancel`` only guarantees that a queued task never starts; use the process engine when
running tasks must be killable. Tasks share the process's working directory, so they are not
moved into their sandbox (its path is still created and given to shell commands).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tether.endpoint.execute import run_task
from tether.protocol import Result
from tether.results import cancelled

from .base import Engine, TaskSpec


class ThreadEngine(Engine):
    workers_read_blobs = True  # workers on this host: see Engine.workers_read_blobs

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.workers = int(self.config.get("workers", 4))
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="tether-task")
        self.cancelled: set[str] = set()
        self.queued: set[str] = set()
        self.running: set[str] = set()

    async def stop(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def submit(self, task: TaskSpec) -> None:
        self.queued.add(task.id)
        self.pool.submit(self._run, task)

    def _run(self, task: TaskSpec) -> None:
        if task.id in self.cancelled:
            self.cancelled.discard(task.id)
            return
        ts = time.time()
        self.loop.call_soon_threadsafe(self._started, task.id, ts)
        result = run_task(task, self.allowed_methods, chdir=False, engine=self.engine_info(), set_env=False)
        self.loop.call_soon_threadsafe(self._finished, result)

    def _started(self, task_id: str, ts: float) -> None:
        self.queued.discard(task_id)
        self.running.add(task_id)
        self.on_running(task_id, ts)

    def _finished(self, result: Result) -> None:
        self.running.discard(result.id)
        if result.id in self.cancelled:
            self.cancelled.discard(result.id)  # already reported as cancelled
        else:
            self.on_result(result)

    def cancel(self, task_id: str) -> None:
        if task_id in self.queued or task_id in self.running:
            self.cancelled.add(task_id)
            self.queued.discard(task_id)
            self.on_result(cancelled(task_id, time.time()))

    def capacity(self) -> dict[str, Any]:
        return {
            "engine": "thread",
            "workers_total": self.workers,
            "workers_idle": max(0, self.workers - len(self.running)),
            "tasks_queued": len(self.queued),
            "tasks_running": len(self.running),
        }
