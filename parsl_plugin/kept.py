"""Large app results stay on the endpoint: what the DataFlowKernel and the user get instead.

Parsl resolves an app's dependencies on the user's side: before it submits ``g(f())``, the
DataFlowKernel waits for ``f``'s AppFuture and puts its ``result()`` in ``g``'s arguments. For
a result the endpoint keeps (one over the blob threshold, see ``docs/payloads.md``), that result
is a :class:`KeptProxy`: a lazy proxy (``lazy-object-proxy``, the pattern ProxyStore uses with
Parsl) that fetches the value the first time it is used as the value. ``TetherExecutor``
recognises it among an app's arguments without touching it and sends the reference instead, so
a chain of apps on one endpoint moves nothing through the user's process, while the user's own
``.result()`` still behaves as the value (``resolve`` gives the plain object).
"""

from __future__ import annotations

from typing import Any

import lazy_object_proxy

from tether import RemoteValue
from tether.refs import swap_inputs


class _Fetch:
    """The proxy's factory: fetches the kept value (and names the handle, for the executor)."""

    __slots__ = ("handle",)

    def __init__(self, handle: RemoteValue):
        self.handle = handle

    def __call__(self) -> Any:
        return self.handle.fetch()


class KeptProxy(lazy_object_proxy.Proxy):  # type: ignore[misc]
    """Stands for an app's result kept on its endpoint; fetched on first use.

    ``isinstance`` (and ``functools.singledispatch``, which the DataFlowKernel uses on every
    argument and result) look at ``__class__``: it answers with the value's type as the
    endpoint named it, without fetching, when that class is imported here.
    """

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # noqa: D105
        factory = self.__factory__
        known = factory.handle.value_type() if type(factory) is _Fetch else None
        return known if known is not None else type(self.__wrapped__)


def kept_proxy(handle: RemoteValue) -> KeptProxy:
    """What an app's future resolves to when its endpoint keeps the result."""
    return KeptProxy(_Fetch(handle))


def handle_of(obj: Any) -> RemoteValue | None:
    """The handle behind a :class:`KeptProxy` (None for anything else), without fetching it."""
    if type(obj) is KeptProxy:
        factory = obj.__factory__
        if type(factory) is _Fetch:
            return factory.handle
    return None


def with_handles(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """An app's arguments with each KeptProxy replaced by its handle (which
    :class:`tether.Executor` sends as a reference): nothing is fetched."""
    def resolve(obj: Any) -> Any:
        handle = handle_of(obj)
        return obj if handle is None else handle

    new_args, new_kwargs, _ = swap_inputs(args, kwargs, resolve)
    return new_args, new_kwargs


def resolve(value: Any) -> Any:
    """The plain value of an app's result (fetched now if the endpoint kept it)."""
    handle = handle_of(value)
    return value.__wrapped__ if handle is not None else value
