"""Run one task: deserialize its function and arguments, call it in its sandbox, serialize the
outcome. Shared by every engine (threads, worker processes, Parsl workers), so a task behaves
the same wherever it runs."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from msgspec import Struct

from tether.errors import MethodNotAllowed, SerializationError
from tether.protocol import DEFAULT_BLOB_THRESHOLD, Result, TaskState
from tether.refs import fill_inputs
from tether.results import failure, success
from tether.runtime import TaskContext, set_current, task_id_environment
from tether.serialize import RESULT, deserialize, serialize, serialize_into
from tether.spill import Spill
from tether.transfer import file_of, file_stub, load_file, load_service_blob, service_blob_of

#: the endpoint daemon names a directory here (its ``blobs/``) where workers write results too
#: large for a frame, so a large result crosses to the daemon as a file, not through a pipe
SPILL_DIR_ENV = "TETHER_SPILL_DIR"

_functions: dict[str, Any] = {}


class TaskSpec(Struct, frozen=True):
    """A task as the daemon hands it to an engine and an engine to :func:`run_task`: one record
    (a Parsl worker gets it pickled as it is; a process worker gets its fields, see
    ``engines/worker.py``)."""

    id: str
    function_id: str
    function_body: bytes | None
    payload: bytes
    spec: dict[str, Any] | None
    sandbox: str | None
    #: the results of tasks this one takes as inputs (``Task.inputs``): inline data or file stubs
    #: of kept results and downloads, put in place of the placeholders before the call
    inputs: dict[str, bytes] | None = None


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


def load_function(fid: str, body: bytes | None, allowed_methods: frozenset[str] | None = None) -> Any:
    """The callable for a function id, deserialized once per process."""
    fn = _functions.get(fid)
    if fn is None:
        if body is None:
            raise SerializationError(f"function {fid} was not sent to this worker")
        local = file_of(body)  # a large body the daemon fetched as a blob
        fn = _functions[fid] = load_file(local[0], allowed_methods) if local else deserialize(body, allowed_methods)
    return fn


def arguments_refusal(method: str, allowed_methods: frozenset[str]) -> str:
    """Why arguments serialized with ``method`` are refused here, and what to do (said the same
    whether the daemon saw them first or the worker read them from the service)."""
    allowed = sorted(allowed_methods)
    return (f"arguments serialized with {method!r}, which this endpoint does not accept (allowed: "
            f"{', '.join(allowed)}); submit with Executor(data_serializer='{allowed[0]}')")


def load_payload(payload: bytes, allowed_methods: frozenset[str] | None) -> Any:
    """Arguments, inline, from the file the daemon downloaded them to, or (large ones, where the
    worker runs beside its daemon) from the service as they arrive."""
    blob = service_blob_of(payload)
    if blob is not None:
        try:
            return load_service_blob(blob, allowed_methods, "arguments")
        except MethodNotAllowed as exc:
            assert allowed_methods is not None
            raise PermissionError(arguments_refusal(exc.method, allowed_methods)) from None
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
    return file_stub(spill.path, spill.digest) if spill.path is not None else spill.getvalue()


def run_task(task: TaskSpec, allowed_methods: Allowlist | frozenset[str] | None = None, *, chdir: bool = True,
             engine: dict[str, Any] | None = None, set_env: bool = True) -> Result:
    """Execute and return its RESULT record (never raises: a failure is a result too).

    ``chdir``: run in ``task.sandbox`` (created, and removed again if the task left it empty);
    ``set_env``: put ``TETHER_TASK_ID`` in the environment (not in shared-process engines).
    """
    set_current(TaskContext(task.id, task.sandbox, task.spec, engine or {}))
    try:
        return _run(task, allowed_methods, chdir, set_env)
    finally:
        set_current(None)


def _run(task: TaskSpec, allowed_methods: Allowlist | frozenset[str] | None, chdir: bool, set_env: bool) -> Result:
    task_id, sandbox = task.id, task.sandbox
    times = {TaskState.RUNNING.value: time.time()}
    data_methods, function_methods = _split(allowed_methods)
    try:
        fn = load_function(task.function_id, task.function_body, function_methods)
        args, kwargs = load_payload(task.payload, data_methods)
        if task.inputs:  # results of other tasks, kept here or fetched: the allowlist holds for them too
            values = {tid: load_payload(data, data_methods) for tid, data in task.inputs.items()}
            args, kwargs = fill_inputs(args, kwargs, values)
            del values
    except BaseException as exc:  # noqa: BLE001
        return failure(task_id, exc, times)
    previous = None
    if set_env:
        task_id_environment.set(task_id)
    if sandbox is not None and chdir:
        Path(sandbox).mkdir(parents=True, exist_ok=True)
        previous = os.getcwd()
        os.chdir(sandbox)
    kind = None
    try:
        value = fn(*args, **kwargs)
        del args, kwargs  # a large argument need not outlive the call
        data = serialize_result(task_id, value)
        if file_of(data) is not None:  # large: its type travels with it (see KeptRef.type)
            cls = type(value)
            kind = f"{cls.__module__}.{cls.__qualname__}"
    except BaseException as exc:  # noqa: BLE001 - SystemExit in user code is a task failure, not ours
        return failure(task_id, exc, times)
    finally:
        if set_env:
            task_id_environment.clear()
        if previous is not None:
            os.chdir(previous)
            try:
                os.rmdir(sandbox)  # only succeeds when the task left nothing behind
            except OSError:
                pass
    result = success(task_id, data, times)
    if kind is not None:
        result.kind = kind[:256]
    return result
