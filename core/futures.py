"""The future a Tether submission returns: a real ``concurrent.futures.Future`` that follows the
remote task (RUNNING when the endpoint starts it) and whose ``cancel()`` reaches the endpoint.

Two rules keep the client's connection thread safe from user code and from races:

* a future is settled (result, exception, cancel) with one check-and-set under its lock
  (:meth:`TetherFuture._settle`), so a result arriving while the user cancels is simply dropped,
  never an ``InvalidStateError`` on the connection thread;
* a future's ``threading.Condition`` (1.3 KB: an RLock, a deque, bound methods) is made only
  when a thread must wait on it; until then its state changes happen under one module lock
  (:data:`_MAKE_LOCK`, under which no condition can be made), so a million pending futures
  cost a million small objects, not 1.3 GB of conditions;
* done-callbacks never run on the connection thread: when it settles a future, the callbacks
  go to one process-wide callback thread (:class:`_CallbackRunner`). A callback that blocks, or
  waits on another future's result, delays other callbacks but never the results themselves.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING
from typing import Any

from .errors import TaskCancelled
from .protocol import TaskState
from .refs import RemoteValue

log = logging.getLogger("tether.futures")

_ORDER = {state.value: i for i, state in enumerate(TaskState)}
WAITING_FOR_ENDPOINT = TaskState.WAITING.value
_HELD = frozenset({TaskState.DISPATCHED.value, TaskState.RUNNING.value})
_DONE = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)
#: guards the making of futures' conditions, and the state of futures that have none yet
_MAKE_LOCK = threading.Lock()


class _CallbackRunner:
    """One daemon thread that runs done-callbacks handed over by connection threads."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[TetherFuture, list[Callable[[Any], object]]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.owner_threads: set[int] = set()  # idents of threads whose callbacks are handed over

    def submit(self, fut: TetherFuture, callbacks: list[Callable[[Any], object]]) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="tether-callbacks", daemon=True)
                    self._thread.start()
        self._queue.put((fut, callbacks))

    def _run(self) -> None:
        while True:
            fut, callbacks = self._queue.get()
            for callback in callbacks:
                try:
                    callback(fut)
                except Exception:  # noqa: BLE001 - as concurrent.futures does: log, go on
                    log.exception("exception calling callback for %r", fut)


#: connection threads register here (see Connection._run); futures they settle defer their callbacks
callbacks = _CallbackRunner()


class TetherFuture(concurrent.futures.Future):
    """Future of one remote task.

    ``task_id``: the id the service knows the task by; ``state``: its last known state
    (a :class:`tether.protocol.TaskState` value); ``transitions``: ``{state: unix time}``.
    Unlike a local future, ``cancel()`` succeeds on a running task: its process is killed on
    the endpoint.
    """

    def __init__(self, task_id: str, on_cancel: Callable[[str], None] | None = None):
        # concurrent.futures.Future.__init__ (CPython 3.11-3.13) without the condition, made on demand
        self._state = PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Callable[[Any], object]] = []
        self.task_id = task_id
        self.state: str = TaskState.RECEIVED.value
        self.transitions: dict[str, float] = {}
        self._on_cancel = on_cancel
        #: the connection its result comes on (asked what it waits for when a wait times out)
        self.waiting_on: Any = None
        #: how a large result's download shows progress (the Executor's ``progress`` option)
        self.progress: bool | None = None
        #: called (inline, with the future) once it is settled: the Executor's bookkeeping, not user code
        self._on_settled: Callable[[TetherFuture], None] | None = None
        #: the handle of a result kept on the endpoint (fetched by ``result()``), or None
        self._kept: RemoteValue | None = None
        #: futures and handles this task takes as inputs, kept alive (not released) until it is done
        self._inputs: list[Any] | None = None
        #: what ``result()`` returns for a kept result instead of fetching it (the Parsl plugin: a
        #: lazy proxy, so the DataFlowKernel passes it on to the next app without fetching)
        self.kept_as: Callable[[RemoteValue], Any] | None = None

    def __repr__(self) -> str:
        return f"<TetherFuture {self.task_id} {self.state}>"

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        """The base class's condition, made the first time anything needs it (to wait, mostly)."""
        cond = self.__dict__.get("_cond")
        if cond is None:
            with _MAKE_LOCK:
                cond = self.__dict__.get("_cond")
                if cond is None:
                    cond = self.__dict__["_cond"] = threading.Condition()
        return cond

    def _change(self, change: Callable[[threading.Condition | None], Any]) -> Any:
        """Run ``change`` holding the future's condition, or, if it has none yet, the module
        lock (no thread can be waiting then, and none can start to until ``change`` is done)."""
        while True:
            cond = self.__dict__.get("_cond")
            with cond if cond is not None else _MAKE_LOCK:
                if cond is None and self.__dict__.get("_cond") is not None:
                    continue  # made while we took the lock: use it
                return change(cond)

    # lock-free reads: one attribute read is atomic, and these never need to wait
    def done(self) -> bool:
        return self._state in _DONE

    def cancelled(self) -> bool:
        return self._state in (CANCELLED, CANCELLED_AND_NOTIFIED)

    def running(self) -> bool:
        return self._state == RUNNING

    def _record(self, state: str, ts: float | None) -> None:
        if state == WAITING_FOR_ENDPOINT and self.state in _HELD and ts is not None \
                and ts >= max(self.transitions.values(), default=0.0):
            # its endpoint went away while holding it: it waits again, and is dispatched again later
            self.transitions = {s: t for s, t in self.transitions.items() if s not in _HELD}
            self.transitions[state] = ts
            self.state = state
            return
        if ts is not None and state not in self.transitions:
            rank = _ORDER.get(state, len(_ORDER))
            last = next(reversed(self.transitions), None)  # kept in order: the last is the latest
            in_order = last is None or _ORDER.get(last, len(_ORDER)) <= rank
            self.transitions[state] = ts
            if not in_order:  # reports arrive out of order (a result carries times that status updates lacked)
                self.transitions = dict(sorted(self.transitions.items(), key=lambda kv: _ORDER.get(kv[0], len(_ORDER))))
        if _ORDER.get(state, 0) >= _ORDER.get(self.state, 0):  # never backwards
            self.state = state

    def _mark_running(self) -> None:
        def change(_cond: threading.Condition | None) -> None:
            if self._state == PENDING:
                self._state = RUNNING

        self._change(change)

    def _settle(self, value: Any = None, exception: BaseException | None = None) -> bool:
        """Set the result (or exception) unless the future is already done; True if it was set.

        The check and the set are one step under the future's lock: a cancel racing a result
        makes the result a no-op, never an ``InvalidStateError``.
        """
        def change(cond: threading.Condition | None) -> bool:
            if self._state in _DONE:
                return False
            if exception is not None:
                self._exception = exception
            else:
                self._result = value
            self._state = FINISHED
            for waiter in self._waiters:
                if exception is not None:
                    waiter.add_exception(self)
                else:
                    waiter.add_result(self)
            if cond is not None:
                cond.notify_all()
            return True

        if not self._change(change):
            return False
        self._after_settled()
        return True

    def set_result(self, result: Any) -> None:
        if not self._settle(result):
            raise concurrent.futures.InvalidStateError(f"{self._state}: {self!r}")

    def set_exception(self, exception: BaseException | None) -> None:
        if not self._settle(exception=exception if exception is not None else TaskCancelled("no exception")):
            raise concurrent.futures.InvalidStateError(f"{self._state}: {self!r}")

    def _settle_kept(self, kept: RemoteValue) -> bool:
        """Settle with a result that stays on the endpoint: ``result()`` fetches it when asked."""
        self._kept = kept
        return self._settle(kept)

    def remote_value(self) -> RemoteValue | None:
        """The handle of this task's result if its endpoint keeps it (a large result), without
        fetching anything; None for a result that came with the answer (or a pending task).
        Pass the handle, or the future itself, to another task: only the reference travels."""
        return self._kept

    def release(self) -> None:
        """Let the endpoint free this task's kept result now; ``result()`` afterwards returns it
        only if it was fetched before. Otherwise the result is freed when the future (and every
        handle to it) is garbage collected, or after the endpoint's retention period."""
        kept = self._kept
        if kept is not None:
            kept.release()

    def _after_settled(self) -> None:
        self._inputs = None  # its inputs may be released now
        done, self._on_settled = self._on_settled, None
        if done is not None:
            done(self)
        self._invoke_callbacks()

    def _invoke_callbacks(self) -> None:
        """Run done-callbacks here, unless this is a connection thread: then on the callback thread."""
        if not self._done_callbacks:
            return
        if threading.get_ident() in callbacks.owner_threads:
            pending = self._change(lambda _cond: self._take_callbacks())
            callbacks.submit(self, pending)
        else:
            super()._invoke_callbacks()

    def _take_callbacks(self) -> list[Callable[[Any], object]]:
        pending, self._done_callbacks = self._done_callbacks, []
        return pending

    def cancel(self) -> bool:
        """Cancel the task wherever it is: queued tasks never run, running ones are killed."""

        def change(cond: threading.Condition | None) -> bool | None:
            if self._state == FINISHED:
                return False
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
            # straight to CANCELLED_AND_NOTIFIED: no local executor will pick this future up
            self._state = CANCELLED_AND_NOTIFIED
            self.state = TaskState.CANCELLED.value
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            if cond is not None:
                cond.notify_all()
            return None  # cancelled now

        outcome = self._change(change)
        if outcome is not None:
            return outcome
        self._after_settled()
        on_cancel, self._on_cancel = self._on_cancel, None
        if on_cancel is not None:
            on_cancel(self.task_id)
        return True

    def _cancelled_remotely(self) -> None:
        """The service reports the task cancelled (by another process or the REST API)."""
        self._on_cancel = None
        self.cancel()

    def result(self, timeout: float | None = None) -> Any:
        if self._state == FINISHED and self._exception is None:
            value = self._result  # settled: no need to make a condition to read it
        else:
            value = self._wait_for_result(timeout)
        if value is not None and value is self._kept:
            present = self.kept_as
            value = present(value) if present is not None else self._fetch_kept(value, timeout)
        return value

    def _fetch_kept(self, kept: RemoteValue, timeout: float | None) -> Any:
        """Download a kept result, once: the first caller fetches, the others wait for it."""
        lock = self.__dict__.get("_fetch_lock")
        if lock is None:
            with _MAKE_LOCK:
                lock = self.__dict__.setdefault("_fetch_lock", threading.Lock())
        with lock:
            if self._result is kept:
                self._result = kept.fetch(timeout, self.progress)
            return self._result

    def _wait_for_result(self, timeout: float | None) -> Any:
        try:
            return super().result(timeout)
        except concurrent.futures.CancelledError:
            raise TaskCancelled(f"task {self.task_id} was cancelled") from None
        except TimeoutError:
            if self.done():
                raise
            why = self.waiting_on.why_waiting() if self.waiting_on is not None else ""
            raise TimeoutError(f"task {self.task_id} has no result after {timeout:g} s (it is {self.state}){why}") \
                from None

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            return super().exception(timeout)
        except concurrent.futures.CancelledError:
            raise TaskCancelled(f"task {self.task_id} was cancelled") from None
