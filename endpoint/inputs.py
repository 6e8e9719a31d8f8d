"""A task's inputs, gathered where the data is.

A task whose arguments hold other tasks' results (``Task.inputs``) waits here until each is
available, then runs with the values put in (:func:`tether.refs.fill_inputs`, in the worker).
Each input comes from the nearest place that has it:

1. this endpoint's kept results (:mod:`tether.endpoint.kept`): the worker maps the file, so a
   result computed here and used here never leaves the machine;
2. a task this endpoint holds and has not finished: the dependent waits for it here, and is
   failed in words if it fails or is cancelled;
3. otherwise the service (a ``fetch`` frame): results kept on another endpoint come as blobs
   (uploaded once by that endpoint), inline results as bytes, a failed or lost input as an
   error that fails the dependent task, in words. Asked again after a reconnect.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from tether.ids import child_path
from tether.protocol import ErrorCode, ErrorInfo, Fetch, Fetched, Result, TaskState, blob_ref_of, encode, kept_ref_of
from tether.transfer import file_stub

from .kept import KeptResults
from .payloads import EndpointPayloads

log = logging.getLogger("tether.endpoint.inputs")


class InputFailed(Exception):
    """An input of a task failed, was cancelled or is lost: the task fails with this, in words."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.INPUT_FAILED):
        super().__init__(message)
        self.code = code


class Inputs:
    """The inputs of the tasks one endpoint holds.

    ``holds(task_id)``: whether a task is queued or running here (its result will come here);
    ``send(frame)``: a frame to the service (dropped while disconnected: see :meth:`resend`).
    """

    def __init__(self, kept: KeptResults, payloads: EndpointPayloads, holds: Callable[[str], bool],
                 send: Callable[[bytes], None]):
        self.kept, self.payloads, self.holds, self.send = kept, payloads, holds, send
        self._local: dict[str, list[asyncio.Future[bytes]]] = {}  # a task here -> who waits for its result
        self._remote: dict[str, asyncio.Future[bytes]] = {}  # asked of the service, not answered yet
        self._used: dict[str, tuple[list[str], list[Path]]] = {}  # task -> (kept inputs pinned, downloads)

    async def gather(self, task_id: str, input_ids: list[str]) -> dict[str, bytes]:
        """``{input id: inline data or file stub}`` for a task; raises InputFailed."""
        loop = asyncio.get_running_loop()
        pinned, downloads = self._used.setdefault(task_id, ([], []))
        values: dict[str, bytes] = {}
        waiting: dict[str, asyncio.Future[bytes]] = {}
        ask: list[str] = []
        for tid in dict.fromkeys(input_ids):
            if tid in self.kept:
                values[tid] = self._read_kept(tid, pinned)
            elif self.holds(tid):
                fut = loop.create_future()
                self._local.setdefault(tid, []).append(fut)
                waiting[tid] = fut
            else:
                fut = self._remote.get(tid)
                if fut is None:
                    fut = self._remote[tid] = loop.create_future()
                    ask.append(tid)
                waiting[tid] = fut
        if ask:
            self.send(encode(Fetch(ids=ask)))
        for tid, fut in waiting.items():
            data = await asyncio.shield(fut)
            kept = kept_ref_of(data)
            if kept is not None:  # finished here meanwhile, and kept
                if tid not in self.kept:
                    raise InputFailed(f"input task {tid}: its result was freed before this task could read it",
                                      ErrorCode.RESULT_LOST)
                data = self._read_kept(tid, pinned)
            ref = blob_ref_of(data)
            if ref is not None:  # kept on another endpoint (or stored by the service): download it here
                path = child_path(self.payloads.dir, task_id, "task id")
                path = path.with_name(f"{path.name}.input-{tid}")
                downloads.append(path)
                await asyncio.to_thread(self.payloads.client().download_to, ref, path,
                                        f"input {tid} of task {task_id}")
                data = file_stub(path, ref.digest)
            values[tid] = data
        return values

    def _read_kept(self, tid: str, pinned: list[str]) -> bytes:
        """A kept result as a task's input: pinned until the task ends, handed over as a file stub."""
        self.kept.pin(tid)
        pinned.append(tid)
        return file_stub(self.kept.path(tid), self.kept.digest(tid) or "")

    def produced(self, result: Result) -> None:
        """A task here ended: the tasks waiting for its result go on (or fail, in words)."""
        waiters = self._local.pop(result.id, None)
        if not waiters:
            return
        if result.state == TaskState.SUCCESS.value and result.data is not None:
            for fut in waiters:
                if not fut.done():
                    fut.set_result(result.data)
            return
        error = _failed_input(result.id, result.error, result.state)
        for fut in waiters:
            if not fut.done():
                fut.set_exception(error)

    def fetched(self, msg: Fetched) -> None:
        """The service's answer to our ``fetch``."""
        for tid, data in msg.data.items():
            fut = self._remote.pop(tid, None)
            if fut is not None and not fut.done():
                fut.set_result(data)
        for tid, error in msg.errors.items():
            fut = self._remote.pop(tid, None)
            if fut is not None and not fut.done():
                fut.set_exception(_failed_input(tid, error, TaskState.FAILED.value))

    def resend(self) -> None:
        """After a reconnect: ask again for what the service had not answered."""
        pending = [tid for tid, fut in self._remote.items() if not fut.done()]
        for start in range(0, len(pending), 1000):
            self.send(encode(Fetch(ids=pending[start : start + 1000])))

    def done(self, task_id: str) -> None:
        """The task ended: its kept inputs may be freed, its downloaded inputs go."""
        used = self._used.pop(task_id, None)
        if used is None:
            return
        pinned, downloads = used
        for tid in pinned:
            self.kept.unpin(tid)
        for path in downloads:
            path.unlink(missing_ok=True)


def _failed_input(tid: str, error: ErrorInfo | None, state: str) -> InputFailed:
    """The words for an input that has no value: what happened to it, and its own message."""
    if error is not None and error.code in (ErrorCode.RESULT_LOST.value, ErrorCode.ENDPOINT_OFFLINE.value):
        return InputFailed(f"input task {tid}: {error.message}", ErrorCode(error.code))
    what = "was cancelled" if state == TaskState.CANCELLED.value else "failed"
    detail = f": {error.type}: {error.message}" if error is not None else ""
    return InputFailed(f"input task {tid} {what}{detail}")
