"""Typed, catchable errors raised by the client. Every message says what is wrong and what to do."""

from __future__ import annotations

import builtins
import concurrent.futures
from typing import Any


class TetherError(Exception):
    """Base of every error Tether raises on purpose."""


class AuthError(TetherError):
    """The service refused the credentials (missing, wrong or revoked token)."""


class ConfigError(TetherError):
    """A configuration (file, environment, argument) is missing or wrong."""


class EndpointOffline(TetherError):
    """The endpoint is not connected to the service."""


class ServiceUnreachable(TetherError, ConnectionError):
    """The service could not be reached for longer than the client was told to wait."""


class UnknownEndpoint(TetherError):
    """The endpoint id does not exist, or is not visible to this identity."""


class PayloadTooLarge(TetherError):
    """An argument or result is larger than the service accepts."""


class InvalidResourceSpecification(TetherError, ValueError):
    """A resource specification has unknown keys or values that cannot be satisfied."""


class InvalidEnvironment(TetherError, ValueError):
    """An environment request (``Executor(environment=...)``) is malformed: said before it is sent."""


class EnvironmentUnavailable(TetherError):
    """The endpoint cannot give a task the environment it asked for: environments are off there,
    no interpreter of that Python version is allowed, or building it failed (the installer's
    own message is in the text)."""


class SerializationError(TetherError):
    """A function, its arguments or its result could not be (de)serialized."""


class MethodNotAllowed(SerializationError):
    """Data serialized with a method the loading side does not allow (``method`` names it)."""

    def __init__(self, message: str, method: str):
        super().__init__(message)
        self.method = method


class VersionMismatch(SerializationError):
    """Client and endpoint run different Python versions, which pickled code does not survive."""


class TaskRejected(TetherError):
    """The service refused to accept a task at submission (the message says why)."""


class QuotaExceeded(TaskRejected):
    """The service refused a task because a per-user limit is reached (e.g. tasks waiting or
    running); the message names the limit. Wait for some tasks to finish, then submit again."""


class TaskCancelled(TetherError, concurrent.futures.CancelledError):
    """The task was cancelled before it produced a result (also a ``concurrent.futures.CancelledError``)."""


class TaskFailed(TetherError):
    """The task raised on the endpoint. Carries the remote type name, message and traceback."""

    def __init__(self, remote_type: str, message: str, remote_traceback: str = "", task_id: str = ""):
        self.remote_type = remote_type
        self.remote_message = message
        self.remote_traceback = remote_traceback
        self.task_id = task_id
        super().__init__(remote_type, message)

    def __str__(self) -> str:
        text = f"{self.remote_type}: {self.remote_message}"
        if self.remote_traceback:
            text += f"\n\nRemote traceback (task {self.task_id}):\n{self.remote_traceback.rstrip()}"
        return text

    def __reduce__(self) -> tuple[Any, ...]:
        return (TaskFailed, (self.remote_type, self.remote_message, self.remote_traceback, self.task_id))


_hybrids: dict[type, type] = {}
_TASK_FAILED_FIELDS = frozenset({"remote_type", "remote_message", "remote_traceback", "task_id"})


def _remote_str(self: TaskFailed) -> str:
    """A remote exception of a type known here: its own message (the type is its class's name),
    then the remote traceback."""
    text = self.remote_message
    if self.remote_traceback:
        text += f"\n\nRemote traceback (task {self.task_id}):\n{self.remote_traceback.rstrip()}"
    return text


def _remote_repr(self: TaskFailed) -> str:
    return f"{type(self).__name__}{self.args!r}" if len(self.args) != 1 else f"{type(self).__name__}({self.args[0]!r})"


def task_failed(error: dict[str, Any], original: BaseException | None, task_id: str) -> TaskFailed:
    """Build the exception a failed future raises.

    Where the remote exception type is known here, the result is an instance of a class that
    derives from both :class:`TaskFailed` and that type, so ``except ZeroDivisionError`` and
    ``except TaskFailed`` both catch it, and the remote traceback is in its text.
    """
    from .tracebacks import localize

    type_name = error.get("type") or "Exception"
    args = (type_name, error.get("message", ""), localize(error.get("traceback") or ""), task_id)
    if isinstance(original, Exception):
        remote_cls: Any = type(original)
    else:  # the exception did not unpickle here (another Python, say); builtin and Tether's own
        # types can still be matched by name
        module, _, name = type_name.rpartition(".")
        remote_cls = (getattr(builtins, name, None) if module in ("", "builtins")
                      else globals().get(name) if module == __name__ else None)
    if isinstance(remote_cls, type) and issubclass(remote_cls, Exception) and not issubclass(remote_cls, TaskFailed):
        hybrid = _hybrids.get(remote_cls)
        if hybrid is None:
            try:  # named as the remote type, so an uncaught one prints "KeyError: 'b'", as it would locally
                hybrid = type(remote_cls.__name__, (TaskFailed, remote_cls), {
                    "__module__": remote_cls.__module__, "__qualname__": remote_cls.__qualname__,
                    "__str__": _remote_str, "__repr__": _remote_repr})
            except TypeError:  # incompatible layouts (some C exception types)
                hybrid = TaskFailed
            _hybrids[remote_cls] = hybrid
        try:
            exc = hybrid(*args)
        except Exception:  # a constructor that insists on its own signature
            pass
        else:
            if original is not None:  # keep what the remote exception carried (e.g. .result, .args)
                for key, value in vars(original).items():
                    if key not in _TASK_FAILED_FIELDS:
                        setattr(exc, key, value)
                exc.args = original.args
            return exc
    return TaskFailed(*args)


class BlobCorrupt(TetherError):
    """A blob's bytes do not hash to what its reference says: it was not used."""


class ResultLost(TetherError):
    """A result kept on its endpoint is not there any more (released, expired, or its store was
    lost), or the endpoint keeping it is out of reach: the message says which, and what to do."""
