"""The future a Tether submission returns: a real ``concurrent.futures.Future`` that follows the
remote task (RUNNING when the endpoint starts it) and whose ``cancel()`` reaches the endpoint."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING
from typing import Any

from .errors import TaskCancelled
from .protocol import TaskState

_ORDER = {state.value: i for i, state in enumerate(TaskState)}


class TetherFuture(concurrent.futures.Future):
    """Future of one remote task.

    ``task_id``: the id the service knows the task by; ``state``: its last known state
    (a :class:`tether.protocol.TaskState` value); ``transitions``: ``{state: unix time}``.
    Unlike a local future, ``cancel()`` succeeds on a running task: its process is killed on
    the endpoint.
    """

    def __init__(self, task_id: str, on_cancel: Callable[[str], None] | None = None):
        super().__init__()
        self.task_id = task_id
        self.state: str = TaskState.RECEIVED.value
        self.transitions: dict[str, float] = {}
        self._on_cancel = on_cancel
        #: how a large result's download shows progress (the Executor's ``progress`` option)
        self.progress: bool | None = None

    def __repr__(self) -> str:
        return f"<TetherFuture {self.task_id} {self.state}>"

    def _record(self, state: str, ts: float | None) -> None:
        if ts is not None and state not in self.transitions:
            self.transitions[state] = ts
            # reports arrive out of order (a result carries times that status updates lacked)
            self.transitions = dict(sorted(self.transitions.items(), key=lambda kv: _ORDER.get(kv[0], len(_ORDER))))
        if _ORDER.get(state, 0) >= _ORDER.get(self.state, 0):  # never backwards
            self.state = state

    def _mark_running(self) -> None:
        with self._condition:
            if self._state != PENDING:
                return
        self.set_running_or_notify_cancel()

    def cancel(self) -> bool:
        """Cancel the task wherever it is: queued tasks never run, running ones are killed."""
        with self._condition:
            if self._state == FINISHED:
                return False
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
            was_running = self._state == RUNNING
            self._state = CANCELLED
            self.state = TaskState.CANCELLED.value
            self._condition.notify_all()
        if not was_running:
            # moves to CANCELLED_AND_NOTIFIED and wakes concurrent.futures.wait()/as_completed()
            self.set_running_or_notify_cancel()
        else:
            with self._condition:
                self._state = CANCELLED_AND_NOTIFIED
                for waiter in self._waiters:
                    waiter.add_cancelled(self)
        self._invoke_callbacks()
        if self._on_cancel is not None:
            self._on_cancel(self.task_id)
        return True

    def _cancelled_remotely(self) -> None:
        """The service reports the task cancelled (by another process or the REST API)."""
        self._on_cancel = None
        self.cancel()

    def result(self, timeout: float | None = None) -> Any:
        try:
            return super().result(timeout)
        except concurrent.futures.CancelledError:
            raise TaskCancelled(f"task {self.task_id} was cancelled") from None

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            return super().exception(timeout)
        except concurrent.futures.CancelledError:
            raise TaskCancelled(f"task {self.task_id} was cancelled") from None
