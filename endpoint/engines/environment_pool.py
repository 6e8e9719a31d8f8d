"""Worker processes that run in a built environment: the process engine, with workers started
by another interpreter.

The workers are the process engine's (:mod:`.worker`), started by the environment's python with
``-m tether.endpoint.engines.environment_worker`` and the two pipe ends as inherited file
descriptors. What multiprocessing would share with them (the gate that lets idle workers steal
queued tasks) does not cross to another interpreter, so these workers do not steal; the pool
prefetches nothing by default instead, so no task waits behind a long one while a worker idles.
"""

from __future__ import annotations

import json
import os
import subprocess
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from tether.endpoint.execute import Allowlist

from .process import ProcessEngine, _Worker, task_pipe


class _Child:
    """A ``subprocess.Popen`` with the part of ``multiprocessing.Process`` the engine uses."""

    def __init__(self, popen: subprocess.Popen[bytes]):
        self.popen = popen
        self.pid = popen.pid

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()  # negative for a signal, as multiprocessing says it

    def join(self, timeout: float | None = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        self.popen.kill()


def _methods(allowed: Allowlist | frozenset[str] | None) -> dict[str, list[str] | None]:
    data, functions = (allowed.data, allowed.functions) if isinstance(allowed, Allowlist) else (allowed, allowed)
    return {"data_methods": None if data is None else sorted(data),
            "function_methods": None if functions is None else sorted(functions)}


class EnvironmentPool(ProcessEngine):
    """A process engine whose workers run ``python`` (an environment's interpreter)."""

    def __init__(self, python: Path, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.python = python
        venv = python.parent.parent
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env["VIRTUAL_ENV"] = str(venv)  # a task's shell commands find the environment's tools first
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        self.env = env

    def _start_worker(self) -> _Worker:
        tasks_in, tasks_out = os.pipe()
        results_in, results_out = os.pipe()
        options = {**_methods(self.allowed_methods), "engine_info": self.engine_info(),
                   "python_sandbox": self.python_sandbox}
        try:
            popen = subprocess.Popen(
                [str(self.python), "-m", "tether.endpoint.engines.environment_worker", str(tasks_in),
                 str(results_out), json.dumps(options)],
                pass_fds=(tasks_in, results_out), env=self.env, stdin=subprocess.DEVNULL,
                start_new_session=True)  # its own group: cancel kills the task and its children
        finally:
            os.close(tasks_in)  # the worker's ends: its death shows as EOF on ours
            os.close(results_out)
        return _Worker(_Child(popen), Connection(results_in, writable=False), task_pipe(tasks_out), None, None, None)

    def _steal(self) -> None:
        """Nothing to steal safely: the gate is not shared with another interpreter (see the module)."""

    def idle(self) -> bool:
        return not self.queue and not any(w.assigned for w in self.workers)
