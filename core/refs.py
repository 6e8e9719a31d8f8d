"""References to results that stay on the endpoint that computed them.

A result larger than the blob threshold is *kept* by its endpoint (see ``docs/payloads.md``):
the client gets a :class:`RemoteValue`, a small handle that knows the task, the size and how to
fetch the bytes. Passed as an argument (itself, or the future that holds it), it travels as a
:class:`TaskInput` placeholder and the endpoint puts the value in before the call, so data
computed on an endpoint and used there never crosses the user's machine.

Both sides use this module: the client swaps futures and handles for placeholders
(:func:`swap_inputs`), the endpoint's worker swaps placeholders for values (:func:`fill_inputs`).
Only plain containers (``list``, ``tuple``, ``dict``, ``set``) of up to ``SEARCH_ITEMS`` items,
``SEARCH_DEPTH`` levels deep, are searched, the way Parsl and Dask look for futures in
arguments; anything else is pickled as the value itself (a handle fetches its value when it is
pickled).
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from typing import Any

#: how deep containers in a task's arguments are searched for futures and handles
SEARCH_DEPTH = 4
#: containers with more items are not searched (a list of a million numbers costs its submit
#: nothing extra); put futures in smaller containers, or pass them directly
SEARCH_ITEMS = 10_000
_CONTAINERS = (list, tuple, dict, set, frozenset)
_PLAIN = (int, float, str, bytes, bool, type(None))


class TaskInput:
    """In a payload: "the result of task ``task_id`` goes here" (the endpoint fills it in)."""

    __slots__ = ("task_id",)

    def __init__(self, task_id: str):
        self.task_id = task_id

    def __reduce__(self) -> tuple[Any, ...]:
        return TaskInput, (self.task_id,)

    def __repr__(self) -> str:
        return f"TaskInput({self.task_id!r})"


class RemoteValue:
    """A result kept on endpoint ``endpoint``: ``size`` bytes serialized, fetched on demand.

    ``fetch()`` downloads and returns the value (through the service; the endpoint uploads it
    once). Passing the handle, or the future holding it, to another task of the same service
    sends only the reference. When the last handle is gone (garbage collected, or
    ``release()``), the endpoint is told it may free the result.
    """

    __slots__ = ("task_id", "endpoint", "size", "type_name", "_fetch", "_finalizer", "__weakref__")

    def __init__(self, task_id: str, endpoint: str, size: int, fetch: Callable[[str, float | None, bool | None], Any],
                 release: Callable[[str], None] | None, type_name: str = ""):
        self.task_id, self.endpoint, self.size = task_id, endpoint, size
        #: the value's type as ``module.QualName`` ("" when the endpoint did not say)
        self.type_name = type_name
        self._fetch = fetch
        self._finalizer = weakref.finalize(self, release, task_id) if release is not None else None
        if self._finalizer is not None:
            self._finalizer.atexit = False  # at exit the service's retention frees it; no frames then

    def fetch(self, timeout: float | None = None, progress: bool | None = None) -> Any:
        """The value itself: downloaded now (raises :class:`tether.ResultLost` if it is gone).
        ``progress`` as for :class:`tether.Executor` (a bar or log lines for 64 MiB and more)."""
        return self._fetch(self.task_id, timeout, progress)

    def value_type(self) -> type | None:
        """The value's class, if its module is already imported here (never imported for it:
        the name comes from the endpoint), else None."""
        module, _, qualname = self.type_name.rpartition(".")
        found: Any = sys.modules.get(module)
        for part in qualname.split(".") if found is not None else ():
            found = getattr(found, part, None)
        return found if isinstance(found, type) else None

    def release(self) -> None:
        """Let the endpoint free the result now (later fetches raise ``ResultLost``)."""
        if self._finalizer is not None:
            self._finalizer()

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled where no placeholder could stand for it (deep inside an object, or by other
        # code): the value itself travels, so nothing changes meaning
        return _identity, (self.fetch(),)

    def __repr__(self) -> str:
        return f"<RemoteValue of task {self.task_id}: {self.size} bytes kept on endpoint {self.endpoint}>"


def _identity(value: Any) -> Any:
    return value


class Swapped:
    """What :func:`swap_inputs` found: the task ids in order, and the handles to keep alive
    until the task is done (so its inputs are not released under it)."""

    __slots__ = ("ids", "holders")

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.holders: list[Any] = []


def swap_inputs(args: tuple, kwargs: dict, resolve: Callable[[Any], Any]) -> tuple[tuple, dict, Swapped | None]:
    """Replace futures and handles in ``args``/``kwargs`` by what ``resolve`` makes of them.

    ``resolve(obj)`` returns ``obj`` itself when it is no reference (most objects), a
    :class:`TaskInput` to send a reference, or a value to send instead. Returns the new
    arguments and what was swapped for placeholders (None when nothing was): the common case
    costs one pass over the arguments and returns the same objects.
    """
    if not kwargs and all(type(a) in _PLAIN for a in args):  # the common case: nothing to look into
        return args, kwargs, None
    found = Swapped()
    new_args = _swap(args, resolve, found, SEARCH_DEPTH)
    new_kwargs = _swap(kwargs, resolve, found, SEARCH_DEPTH) if kwargs else kwargs
    return new_args, new_kwargs, found if found.ids else None


def _swap(obj: Any, resolve: Callable[[Any], Any], found: Swapped, depth: int) -> Any:
    kind = type(obj)
    if kind in _CONTAINERS:
        if depth == 0 or len(obj) > SEARCH_ITEMS:
            return obj
        if kind is dict:
            items = {k: _swap(v, resolve, found, depth - 1) for k, v in obj.items()}
            return items if any(items[k] is not v for k, v in obj.items()) else obj
        items_list = [_swap(v, resolve, found, depth - 1) for v in obj]
        if all(a is b for a, b in zip(items_list, obj, strict=True)):
            return obj
        return kind(items_list)
    if kind in _PLAIN:
        return obj
    new = resolve(obj)
    if type(new) is TaskInput:
        found.ids.append(new.task_id)
        found.holders.append(obj)
    return new


def fill_inputs(args: Any, kwargs: Any, values: dict[str, Any]) -> tuple[Any, Any]:
    """The endpoint's side: placeholders in ``args``/``kwargs`` replaced by ``values[task_id]``."""
    return _fill(args, values, SEARCH_DEPTH + 1), _fill(kwargs, values, SEARCH_DEPTH + 1)


def _fill(obj: Any, values: dict[str, Any], depth: int) -> Any:
    kind = type(obj)
    if kind is TaskInput:
        return values[obj.task_id]
    if kind in _CONTAINERS and depth > 0:
        if kind is dict:
            return {k: _fill(v, values, depth - 1) for k, v in obj.items()}
        return kind(_fill(v, values, depth - 1) for v in obj)
    return obj

