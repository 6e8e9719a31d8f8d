"""A task's outcome as a typed record: the builders of :class:`tether.protocol.Result`.

Whatever ends a task (a worker that ran it, an engine that cancelled it or lost its worker, the
endpoint daemon refusing it or a payload that cannot travel) builds its record here, so a result
looks the same wherever it was made, and what travels worker -> daemon -> spool -> service is
the wire record itself, never a dict reshaped on the way. Core owns the builders, with the
record, so the endpoint and the plugins use one set (endpoint -> core, never back).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterable, Iterator

import msgspec

from .protocol import ErrorCode, ErrorInfo, Result, Results, TaskState, TooLarge, encode, frame_batches
from .serialize import serialize

_SUCCESS, _FAILED, _CANCELLED = TaskState.SUCCESS.value, TaskState.FAILED.value, TaskState.CANCELLED.value

#: one record as msgpack bytes (a map: id, state, data, error, times), and back, validated: how a
#: result crosses a process worker's pipe and lies in the endpoint's spool. A few times cheaper
#: than pickling it (which looks the class up by name for every record).
pack = msgspec.msgpack.Encoder().encode
unpack = msgspec.msgpack.Decoder(Result).decode


def error_info(exc: BaseException, *, message: str | None = None, code: ErrorCode | None = None) -> ErrorInfo:
    """What the client shows of a remote exception: its qualified type, message and traceback."""
    cls = type(exc)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    return ErrorInfo(type=name, message=str(exc) if message is None else message,
                     traceback="".join(traceback.format_exception(exc)),
                     code=code.value if code is not None else None)


def success(task_id: str, data: bytes, times: dict[str, float]) -> Result:
    """The record of a task that returned: ``data`` is its serialized value (or a stub naming it).
    ``times`` is the record's own from here on (no copy on the per-task path)."""
    times[_SUCCESS] = time.time()
    return Result(id=task_id, state=_SUCCESS, data=data, times=times)


def failure(task_id: str, exc: BaseException, times: dict[str, float] | None = None, *,
            message: str | None = None, code: ErrorCode | None = None) -> Result:
    """The record of a task that failed with ``exc``; the exception itself travels too when it
    pickles (so the client can raise it as its own type). ``code`` marks an error the endpoint
    raised itself (a refusal) so the client raises the matching Tether error."""
    try:
        data: bytes | None = serialize(exc)
    except Exception:  # noqa: BLE001 - the text form is enough
        data = None
    times = dict(times or {})
    times[_FAILED] = time.time()
    return Result(id=task_id, state=_FAILED, data=data, error=error_info(exc, message=message, code=code),
                  times=times)


def cancelled(task_id: str, ts: float, detail: str = "cancelled by its owner") -> Result:
    """The record of a task cancelled at ``ts`` (whether or not it had started)."""
    return Result(id=task_id, state=_CANCELLED, error=ErrorInfo(type="TaskCancelled", message=detail),
                  times={_CANCELLED: ts})


def too_large(task_id: str, oversize: TooLarge[Result]) -> Result:
    """A failed record in place of a result too large for any frame (``PAYLOAD_TOO_LARGE``)."""
    return Result(id=task_id, state=_FAILED, times={_FAILED: time.time()},
                  error=ErrorInfo(type="PayloadTooLarge", message=oversize.message("the result of this task"),
                                  code=ErrorCode.PAYLOAD_TOO_LARGE.value))


def result_frames(results: Iterable[Result], max_frame: int, max_count: int) -> Iterator[bytes]:
    """Encoded RESULT frames within ``max_frame`` bytes and ``max_count`` results; a result too
    large for any frame travels as the failure that says so (:func:`too_large`), never not at all.
    The endpoint sends its results this way, and the service its results to clients."""
    for batch in frame_batches(results, max_frame, max_count):
        if isinstance(batch, TooLarge):
            batch = [too_large(batch.item.id, batch)]
        yield encode(Results(results=batch))


__all__ = ["cancelled", "error_info", "failure", "pack", "result_frames", "success", "too_large", "unpack"]
