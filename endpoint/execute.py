"""Run one task: deserialize its function and arguments, call it in its sandbox, serialize the
outcome. Shared by every engine (threads, worker processes, Parsl workers), so a task behaves
the same wherever it runs."""

from __future__ import annotations

import ctypes
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether.errors import SerializationError
from tether.protocol import DEFAULT_BLOB_THRESHOLD, TaskState
from tether.serialize import RESULT, deserialize, serialize, serialize_into
from tether.transfer import Spill, file_of, file_stub, load_file

#: the endpoint daemon names a directory here (its ``blobs/``) where workers write results too
#: large for a frame, so a large result crosses to the daemon as a file, not through a pipe
SPILL_DIR_ENV = "TETHER_SPILL_DIR"

_functions: dict[str, Any] = {}
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


_task_env = _TaskIdEnvironment()


@dataclass(frozen=True)
class Allowlist:
    """What a worker may deserialize, kept apart for arguments and for function bodies.

    An endpoint that lists ``allowed_functions`` runs those (pickled code, checked by hash
    before any reaches a worker) while taking only ``allowed_serialization_methods`` for
    arguments. One set for both let a pickled argument through wherever the daemon did not
    look at it first (a blob, fetched after its check): the worker must hold the line itself.
    """

    data: frozenset[str] | None
    functions: frozenset[str] | None


def _split(allowed: Allowlist | frozenset[str] | None) -> tuple[frozenset[str] | None, frozenset[str] | None]:
    """(methods for arguments, methods for function bodies); a plain set applies to both."""
    if isinstance(allowed, Allowlist):
        return allowed.data, allowed.functions
    return allowed, allowed


def current_task() -> TaskContext | None:
    """The context of the task running in this thread, or None outside a task."""
    return getattr(_local, "task", None)


def load_function(fid: str, body: bytes | None, allowed_methods: frozenset[str] | None = None) -> Any:
    """The callable for a function id, deserialized once per process."""
    fn = _functions.get(fid)
    if fn is None:
        if body is None:
            raise SerializationError(f"function {fid} was not sent to this worker")
        local = file_of(body)  # a large body the daemon fetched as a blob
        fn = _functions[fid] = load_file(local[0], allowed_methods) if local else deserialize(body, allowed_methods)
    return fn


def load_payload(payload: bytes, allowed_methods: frozenset[str] | None) -> Any:
    """Arguments, inline or (large ones) from the file the daemon downloaded them to."""
    local = file_of(payload)
    return load_file(local[0], allowed_methods) if local else deserialize(payload, allowed_methods)


def serialize_result(task_id: str, value: Any) -> bytes:
    """The serialized value, or, past the blob threshold, a stub naming the file it was written
    to (when the daemon named a directory for that): a large result is never held twice."""
    directory = os.environ.get(SPILL_DIR_ENV)
    if not directory:
        return serialize(value, what=RESULT)
    # looked at only if the value is large: a worker on a node that does not see the daemon's
    # directory keeps its result in memory (and sends it through its pipe) instead
    spill = Spill(DEFAULT_BLOB_THRESHOLD, lambda: directory if os.path.isdir(directory) else None,
                  f"{task_id}.result")
    try:
        serialize_into(value, spill, what=RESULT)
    except BaseException:
        spill.discard()
        raise
    spill.close()
    return file_stub(spill.path, spill.sha256) if spill.path is not None else spill.getvalue()


def error_record(exc: BaseException) -> dict[str, str]:
    return {
        "type": _qualname(type(exc)),
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }


def _qualname(cls: type) -> str:
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def failure(task_id: str, exc: BaseException, times: dict[str, float] | None = None) -> dict[str, Any]:
    """A failed-result record; the exception itself travels too when it pickles."""
    try:
        data: bytes | None = serialize(exc)
    except Exception:  # noqa: BLE001 - the text form is enough
        data = None
    times = dict(times or {})
    times[TaskState.FAILED.value] = time.time()
    return {"id": task_id, "state": TaskState.FAILED.value, "data": data, "error": error_record(exc), "times": times}


def run_task(
    task_id: str,
    fid: str,
    body: bytes | None,
    payload: bytes,
    sandbox: str | None,
    allowed_methods: Allowlist | frozenset[str] | None = None,
    chdir: bool = True,
    spec: dict[str, Any] | None = None,
    engine: dict[str, Any] | None = None,
    set_env: bool = True,
) -> dict[str, Any]:
    """Execute and return a RESULT record (never raises: a failure is a result too).

    ``chdir``: run in ``sandbox`` (created, and removed again if the task left it empty);
    ``set_env``: put ``TETHER_TASK_ID`` in the environment (not in shared-process engines).
    """
    _local.task = TaskContext(task_id, sandbox, spec, engine or {})
    try:
        return _run(task_id, fid, body, payload, sandbox, allowed_methods, chdir, set_env)
    finally:
        _local.task = None


def _run(task_id: str, fid: str, body: bytes | None, payload: bytes, sandbox: str | None,
         allowed_methods: Allowlist | frozenset[str] | None, chdir: bool, set_env: bool) -> dict[str, Any]:
    started = time.time()
    times = {TaskState.RUNNING.value: started}
    data_methods, function_methods = _split(allowed_methods)
    try:
        fn = load_function(fid, body, function_methods)
        args, kwargs = load_payload(payload, data_methods)
    except BaseException as exc:  # noqa: BLE001
        return failure(task_id, exc, times)
    previous = None
    if set_env:
        _task_env.set(task_id)
    if sandbox is not None and chdir:
        Path(sandbox).mkdir(parents=True, exist_ok=True)
        previous = os.getcwd()
        os.chdir(sandbox)
    try:
        value = fn(*args, **kwargs)
        del args, kwargs  # a large argument need not outlive the call
        data = serialize_result(task_id, value)
    except BaseException as exc:  # noqa: BLE001 - SystemExit in user code is a task failure, not ours
        return failure(task_id, exc, times)
    finally:
        if set_env:
            _task_env.clear()
        if previous is not None:
            os.chdir(previous)
            try:
                os.rmdir(sandbox)  # only succeeds when the task left nothing behind
            except OSError:
                pass
    times[TaskState.SUCCESS.value] = time.time()
    return {"id": task_id, "state": TaskState.SUCCESS.value, "data": data, "error": None, "times": times}
