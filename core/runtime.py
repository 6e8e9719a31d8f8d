"""What a task sees of itself while it runs on an endpoint: its context (id, sandbox, resource
specification, the engine's facts) and ``TETHER_TASK_ID`` in its environment.

Core owns it because code on both sides reads it: the engines that run tasks set it, and what a
task calls (``ShellFunction``, ``MPIFunction``, the plugins' remote wrappers) reads it, with no
import of the endpoint package (a client-only install has the same module; outside a task
:func:`current_task` is None). The MPI environment of a task is :mod:`tether.mpi`.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass, field
from typing import Any

_local = threading.local()


_local = threading.local()


@dataclass
class TaskContext:
    """What a running task may know about itself (read with :func:`current_task`).

    ``spec`` is the task's resource specification; ``engine`` holds engine facts a task may need
    (e.g. the MPI launcher and the nodes of the block for MPIFunction).
    """

    task_id: str
    sandbox: str | None
    spec: dict[str, Any] | None = None
    engine: dict[str, Any] = field(default_factory=dict)


class _TaskIdEnvironment:
    """``TETHER_TASK_ID`` in the worker's environment, set per task without a leak per task.

    ``os.environ[...] = task_id`` calls libc ``setenv``, which never frees the strings it
    replaces: a worker grew ~95 bytes with every task it ever ran. Here the variable lives in
    one buffer handed to ``putenv`` once (POSIX keeps the pointer, not a copy) and rewritten in
    place for each task, so children started with the inherited environment see it too;
    ``os.environ``'s own mapping is updated directly so Python code sees the same value.
    That uses ``os._Environ``'s private ``_data``/``encodekey``/``encodevalue`` (unchanged from
    Python 3.2 through 3.13); where they or libc are missing, plain ``os.environ`` is the fallback.
    """

    NAME = "TETHER_TASK_ID"
    CAPACITY = 128  # task ids are at most 64 characters (tether.ids)

    def __init__(self) -> None:
        self._prefix = f"{self.NAME}=".encode()
        self._buffer = ctypes.create_string_buffer(len(self._prefix) + self.CAPACITY + 1)
        self._installed = False
        try:
            libc = ctypes.CDLL(None)
            self._putenv, self._unsetenv = libc.putenv, libc.unsetenv
            self._putenv.argtypes, self._unsetenv.argtypes = [ctypes.c_void_p], [ctypes.c_char_p]
            self._data = os.environ._data  # type: ignore[attr-defined]
            self._key = os.environ.encodekey(self.NAME)  # type: ignore[attr-defined]
            self._encode = os.environ.encodevalue  # type: ignore[attr-defined]
            self.fast = os.name == "posix"
        except (AttributeError, OSError):
            self.fast = False

    def set(self, task_id: str) -> None:
        raw = task_id.encode()
        if not self.fast or len(raw) > self.CAPACITY:
            os.environ[self.NAME] = task_id
            return
        ctypes.memmove(self._buffer, self._prefix + raw + b"\0", len(self._prefix) + len(raw) + 1)
        if not self._installed:
            self._putenv(ctypes.addressof(self._buffer))
            self._installed = True
        self._data[self._key] = self._encode(task_id)

    def clear(self) -> None:
        if not self.fast:
            os.environ.pop(self.NAME, None)
            return
        self._data.pop(self._key, None)
        if self._installed:
            self._unsetenv(self.NAME.encode())  # drops the pointer; the buffer is ours and stays
            self._installed = False


#: the one TETHER_TASK_ID of this worker process
task_id_environment = _TaskIdEnvironment()


def current_task() -> TaskContext | None:
    """The context of the task running in this thread, or None outside a task."""
    return getattr(_local, "task", None)


def set_current(context: TaskContext | None) -> None:
    """Make ``context`` this thread's current task (None: no task): what an engine's worker does
    around each call (a plain assignment: it runs once per task, on the hot path)."""
    _local.task = context


__all__ = ["TaskContext", "current_task", "set_current", "task_id_environment"]
