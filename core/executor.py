"""``tether.Executor``: a ``concurrent.futures.Executor`` whose workers are a remote endpoint."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .config import find_service
from .connection import Connection, spill_dir
from .environment import ENVIRONMENT_KEY, EnvironmentRequest, match_environment, parse_environment, this_python
from .errors import InvalidEnvironment, ServiceUnreachable, TetherError
from .futures import TetherFuture
from .ids import check_function_id, check_id, new_task_id
from .protocol import Task, blob_stub
from .refs import RemoteValue, TaskInput, swap_inputs
from .resources import validate_resource_specification
from .serialize import DATA_METHODS, function_id, serialize, serialize_into
from .spill import Spill
from .transfer import SEND_ATTEMPTS

log = logging.getLogger("tether.executor")


class _FunctionCache:
    """Serialized bodies of recently submitted functions, so a hot loop serializes each once.

    Keyed by ``id(fn)`` with a strong reference kept, so an id cannot be reused while cached.
    """

    def __init__(self, size: int = 256):
        self.size = size
        self._items: OrderedDict[int, tuple[Any, str, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, fn: Any) -> tuple[str, bytes]:
        key = id(fn)
        with self._lock:
            item = self._items.get(key)
            if item is not None and item[0] is fn:
                self._items.move_to_end(key)
                return item[1], item[2]
        body = serialize(fn)
        fid = function_id(body)
        with self._lock:
            self._items[key] = (fn, fid, body)
            if len(self._items) > self.size:
                self._items.popitem(last=False)
        return fid, body


def _check_environment(environment: Any) -> str | EnvironmentRequest | None:
    """``"match"``, a validated request, or ``None``; anything else is refused in words here."""
    if environment is None or environment == "match":
        return environment
    if isinstance(environment, str):
        raise InvalidEnvironment(f"environment must be 'match' or a dict such as {{'python': '3.12', "
                                 f"'requirements': ['numpy==1.26.4']}}, not {environment!r}")
    return parse_environment(environment)


class Executor(concurrent.futures.Executor):
    """Run Python callables on a Tether endpoint.

    Args:
        endpoint_id: where tasks run.
        service, token: the service; by default from ``TETHER_SERVICE_URL``/``TETHER_TOKEN`` or
            ``$TETHER_HOME/service.json``.
        task_group_id: tasks are recorded under this group (a new one by default), so another
            process can ``Executor(task_group_id=G).reload()`` them.
        resource_specification: per-task resources (MPI ranks, ...), passed to the endpoint.
        user_endpoint_config: values for a multi-user endpoint's config template.
        environment: the environment tasks run in, built and cached by the endpoint where its
            administrator allows it (docs/environments.md): ``"match"`` (this client's Python
            minor version and the installed distributions the function's code uses, at the
            versions installed here), or ``{"python": "3.12", "requirements": ["numpy==1.26.4"]}``;
            ``None`` (default): the endpoint's own environment.
        data_serializer: how arguments travel: ``"cloudpickle"`` (any Python object) or
            ``"json"`` (plain data only; endpoints that refuse pickled arguments accept it).
        blob_threshold: arguments and function bodies that serialize to more bytes than this
            travel as blobs, streamed through the service's disk (default: what the service
            announces, 8 MiB). Results above the threshold come back the same way.
        keep_results_over: results that serialize to more bytes than this stay on the endpoint
            (a kept result: ``result()`` fetches it when asked, and passing the future to
            another task sends only a reference); default: the blob threshold (8 MiB).
        progress: how a blob transfer shows progress: ``None`` (default) a bar on stderr when it
            is a terminal and INFO log lines otherwise, for transfers of 64 MiB or more;
            ``True`` always a bar; ``False`` never.
        batch_size: most tasks in one submission frame (default 512).
        batch_interval: seconds the client gathers submissions into one frame while they
            stream in (default 0.002); a task submitted after a quiet spell is sent at once.
            Both apply to the process-wide connection, and only when given: an Executor that
            does not set them leaves another's settings alone.
        service_timeout: seconds ``shutdown(wait=True)`` (the end of a ``with`` block) keeps
            waiting for results while the service is out of reach (default 60); then the
            pending futures fail with :class:`ServiceUnreachable`, which says how to get them
            back (:meth:`reload`) once it is up. Waits for results of a reachable service
            never time out.
    """

    def __init__(
        self,
        endpoint_id: str | None = None,
        *,
        service: str | None = None,
        token: str | None = None,
        task_group_id: str | None = None,
        resource_specification: dict[str, Any] | None = None,
        user_endpoint_config: dict[str, Any] | None = None,
        batch_size: int | None = None,
        batch_interval: float | None = None,
        data_serializer: str = "cloudpickle",
        blob_threshold: int | None = None,
        progress: bool | None = None,
        service_timeout: float = 60.0,
        keep_results_over: int | None = None,
        environment: str | dict[str, Any] | None = None,
    ):
        # ids are checked where they enter: they become file names on the endpoint
        self.endpoint_id = check_id(endpoint_id, "endpoint id") if endpoint_id is not None else None
        self.task_group_id = check_id(task_group_id, "task group id") if task_group_id else str(uuid.uuid4())
        if data_serializer not in DATA_METHODS:
            raise TetherError(f"unknown data_serializer {data_serializer!r}; choose one of {', '.join(DATA_METHODS)}")
        self.data_serializer = data_serializer
        self.resource_specification = resource_specification
        self.user_endpoint_config = user_endpoint_config
        self.environment = _check_environment(environment)
        self._matched: dict[str, EnvironmentRequest] = {}  # function id -> what "match" computed for it
        self.batch_size = batch_size
        self.batch_interval = batch_interval
        self._info = find_service(service, token)
        self._conn = Connection.get(self._info)
        if batch_size is not None:  # only when asked: the connection is shared by every Executor here
            self._conn.batch_size = batch_size
        if batch_interval is not None:
            self._conn.batch_interval = batch_interval
        self._functions = _FunctionCache()
        self.blob_threshold = blob_threshold
        if keep_results_over is not None and (not isinstance(keep_results_over, int) or keep_results_over < 0):
            raise TetherError(f"keep_results_over must be a number of bytes (>= 0), not {keep_results_over!r}")
        self.keep_results_over = keep_results_over
        self.progress = progress
        self._futures: set[TetherFuture] = set()
        # notified when the last pending future settles: shutdown(wait=True) waits on this, not
        # on each future (which would make a Condition per pending future: 1.3 KB each)
        self._futures_lock = threading.Condition()
        self._shutdown = False
        self.service_timeout = service_timeout

    # --- submission ----------------------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TetherFuture:
        """Submit ``fn(*args, **kwargs)``; registers ``fn`` with the service the first time."""
        fid, body, blobs = self._function(fn)
        return self._submit(fid, None if self._conn.known_function(fid) else body, args, kwargs, fn, blobs=blobs)

    def submit_task(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        resource_specification: dict[str, Any] | None = None,
        user_endpoint_config: dict[str, Any] | None = None,
        keep_over: int | None = None,
        environment: str | dict[str, Any] | None = None,
    ) -> TetherFuture:
        """Submit ``fn(*args, **kwargs)`` with this call's own resource specification, user
        endpoint config, ``keep_results_over`` (``keep_over``) and environment (the Executor's
        otherwise).

        Plugins (Parsl, Dask, Snakemake) use this: per-task options travel with the task, so
        no shared attribute is swapped around a submit (which races between threads).
        """
        fid, body, blobs = self._function(fn)
        return self._submit(fid, None if self._conn.known_function(fid) else body, tuple(args), dict(kwargs or {}),
                            fn, resource_specification, user_endpoint_config, blobs, keep_over,
                            _check_environment(environment))

    def submit_to_registered_function(
        self, function_id: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> TetherFuture:
        """Submit to a function registered earlier (``register_function``), by its id."""
        return self._submit(check_function_id(function_id), None, tuple(args), dict(kwargs or {}), None)

    def register_function(self, fn: Callable[..., Any]) -> str:
        """Register ``fn`` with the service now and return its id (a content hash)."""
        from .client import Client

        fid, body, _ = self._function(fn)
        Client(service=self._info.url, token=self._info.token).register_function_body(body)
        return fid

    def _threshold(self) -> int | None:
        """Bytes above which a payload goes as a blob (None: the service takes none)."""
        if self.blob_threshold is not None:
            return self.blob_threshold
        return self._conn.blob_threshold

    def _function(self, fn: Any) -> tuple[str, bytes, list[str]]:
        """(function id, body as it travels in frames, blobs it names). A body over the blob
        threshold is uploaded once and travels as a stub; the stub's hash is the function id,
        and since the stub holds the body's digest the id still names the content."""
        fid, body = self._functions.get(fn)
        threshold = self._threshold()
        if threshold is None or len(body) <= threshold:
            return fid, body, []
        ref = self._conn.function_blob(fid, body, self.progress)
        stub = blob_stub(ref)
        return function_id(stub), stub, [ref.id]
    def _submit(self, fid: str, body: bytes | None, args: tuple, kwargs: dict, fn: Any,
                spec: dict[str, Any] | None = None, uec: dict[str, Any] | None = None,
                blobs: list[str] | None = None, keep_over: int | None = None,
                environment: str | EnvironmentRequest | None = None) -> TetherFuture:
        spec = spec if spec is not None else self.resource_specification
        # this call's, else the resource specification's (how the plugins pass it per task), else the Executor's
        # (a specification that is no dict is refused below, in words, by _check_call)
        asked = spec.get(ENVIRONMENT_KEY) if isinstance(spec, dict) else None
        chosen = environment if environment is not None else asked or self.environment
        wanted = self._environment_for(fid, fn, _check_environment(chosen))
        if wanted is not None and (spec is None or isinstance(spec, dict)):
            spec = {**(spec or {}), ENVIRONMENT_KEY: wanted.as_data()}
        uec = uec if uec is not None else self.user_endpoint_config
        if self._shutdown:
            raise RuntimeError("cannot submit to an Executor after shutdown()")
        if self.endpoint_id is None:
            raise TetherError("Executor has no endpoint_id: pass Executor(endpoint_id=...) to submit tasks")
        self._check_call(fn, args, kwargs, spec)
        swapped = None
        if args or kwargs:  # futures and kept results among the arguments travel as references
            args, kwargs, swapped = swap_inputs(args, kwargs, self._as_input)
            if swapped is not None and self.data_serializer != "cloudpickle":
                raise TetherError("futures and kept results as arguments need data_serializer='cloudpickle' "
                                  f"(this Executor has {self.data_serializer!r})")
        task_id = new_task_id()
        threshold = self._threshold()
        spill = None
        if threshold is None:
            payload = serialize((args, kwargs), self.data_serializer)
        else:  # serialized to a file once past the threshold: a large argument is never held twice
            spill = Spill(threshold, spill_dir, f"{task_id}.args", by_reference=True)  # a directory if it spills
            try:
                serialize_into((args, kwargs), spill, self.data_serializer)
            except BaseException:
                spill.discard()
                raise
            payload = b"" if spill.spilled else spill.getvalue()
        task = Task(id=task_id, function=fid, endpoint=self.endpoint_id, payload=payload, group=self.task_group_id,
                    spec=spec, uec=uec, blobs=list(blobs or ()), inputs=swapped.ids if swapped else [],
                    keep=keep_over if keep_over is not None else self.keep_results_over)
        fut = TetherFuture(task.id, on_cancel=self._conn.cancel)
        if swapped is not None:
            fut._inputs = swapped.holders  # not released before this task has read them
        fut.progress = self.progress
        fut.waiting_on = self._conn
        if spill is not None and spill.spilled:
            spill.close()
            self._conn.in_background(self._upload_then_submit, task, fut, body, spill)
        else:
            self._conn.submit(task, fut, body)  # may raise (PayloadTooLarge, AuthError): then nothing is tracked
        self._track(fut)
        return fut

    def _environment_for(self, fid: str, fn: Any, environment: str | EnvironmentRequest | None
                         ) -> EnvironmentRequest | None:
        """The request a task carries: what "match" computes for ``fn`` (once per function), or
        the explicit one."""
        if environment != "match":
            return environment  # type: ignore[return-value]
        if fn is None:  # a function registered earlier: its code is not here to look at
            return EnvironmentRequest(python=this_python())
        found = self._matched.get(fid)
        if found is None:
            found = self._matched[fid] = match_environment(fn)
        return found

    def _as_input(self, obj: Any) -> Any:
        """What an argument becomes: a placeholder for a future or a kept result of this service
        (the endpoint puts the value in), the value of a finished future whose result is here,
        or the object itself."""
        if isinstance(obj, TetherFuture):
            if obj.waiting_on is not self._conn:  # another service's task: its value travels
                return obj.result()
            if obj.done() and obj._kept is None and not obj.cancelled() and obj.exception() is None:
                return obj.result()  # small, and here already
            return TaskInput(obj.task_id)  # pending, kept remotely, or failed (the task fails in words)
        if isinstance(obj, RemoteValue):
            return TaskInput(obj.task_id) if obj._fetch == self._conn.fetch_kept else obj.fetch()
        return obj

    def _upload_then_submit(self, task: Task, fut: TetherFuture, body: bytes | None, spill: Spill) -> None:
        """Declare large arguments as a blob, queue the task naming it, then upload them (on a
        transfer thread): the endpoint's download follows the upload as it happens, so the
        bytes cross the service once, not one trip after the other. A refusal (too large, over
        quota) fails this task alone, before it is sent; an upload that fails after it was sent
        (tried ``SEND_ATTEMPTS`` times) fails its future and cancels it."""
        submitted = False
        try:
            if fut.done():  # cancelled while waiting for a transfer thread
                return
            assert spill.path is not None
            blobs = self._conn.blobs()
            what = f"arguments of task {task.id}"
            ref = blobs.declare(spill.size, spill.digest, what=what)
            task.payload = blob_stub(ref)
            task.blobs = [*task.blobs, ref.id]
            if fut.done():
                return
            self._conn.submit(task, fut, body)
            submitted = True
            blobs.send(ref, spill, what=what, progress=self.progress, attempts=SEND_ATTEMPTS)
        except Exception as exc:  # noqa: BLE001 - the service, the network or the disk: the future says so
            if not fut.done():
                fut._settle(exception=exc if isinstance(exc, TetherError) else TetherError(
                    f"task {task.id}: uploading its arguments ({spill.size} bytes) failed: "
                    f"{type(exc).__name__}: {exc}"))
            if submitted:
                self._conn.cancel(task.id)  # it would wait for arguments that are not coming
        finally:
            spill.discard()

    def _check_call(self, fn: Any, args: tuple, kwargs: dict, spec: dict[str, Any] | None) -> None:
        """Hook for callables that can validate their arguments before anything is sent."""
        if spec is not None:
            validate_resource_specification(spec)
        check = getattr(fn, "validate_call", None)
        if callable(check):
            check(args, kwargs, spec)

    def _track(self, fut: TetherFuture) -> None:
        # not a done-callback: it runs inline wherever the future settles, costs no callback
        # list per future, and leaves the user's callbacks alone
        with self._futures_lock:
            self._futures.add(fut)
        fut._on_settled = self._untrack
        if fut.done():  # settled before the line above: untrack here (discarding twice is harmless)
            self._untrack(fut)

    def _untrack(self, fut: TetherFuture) -> None:
        with self._futures_lock:
            self._futures.discard(fut)
            if not self._futures:
                self._futures_lock.notify_all()

    # --- fire and forget -----------------------------------------------------------------------
    def reload(self) -> list[TetherFuture]:
        """Futures for every task of this executor's task group, finished or not.

        Use it from a new process: ``Executor(endpoint_id=E, task_group_id=G).reload()``.
        """
        from .client import Client

        client = Client(service=self._info.url, token=self._info.token)
        existing = self._conn.futures
        futures = []
        for item in client.get_task_group(self.task_group_id):
            tid = item["task_id"]
            fut = existing.get(tid) or TetherFuture(tid, on_cancel=self._conn.cancel)
            fut.waiting_on = self._conn
            fut._record(item["state"], None)
            futures.append(fut)
        fresh = [f for f in futures if f.task_id not in existing]
        for fut in fresh:
            self._track(fut)
        if fresh:
            self._conn.watch(fresh)
        return futures

    # --- lifecycle -----------------------------------------------------------------------------
    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; optionally cancel pending ones and wait for the rest.

        The process-wide connection stays up for other executors; nothing is lost if the
        process exits with tasks pending: their results stay with the service for ``reload``.
        """
        self._shutdown = True
        with self._futures_lock:
            futures = list(self._futures)
        if cancel_futures:
            with self._conn.batched_cancels():  # one frame per MAX_IDS ids, not one per future
                for fut in futures:
                    fut.cancel()
        if wait:
            self._wait_for_pending()

    def _wait_for_pending(self) -> None:
        """Wait for every pending future. While the service is out of reach, say so every 30 s;
        once it has been out of reach for ``service_timeout``, stop: the pending futures fail
        with :class:`ServiceUnreachable` (their tasks live on in the service, for :meth:`reload`)."""
        said = time.monotonic()
        with self._futures_lock:
            while not self._futures_lock.wait_for(lambda: not self._futures, timeout=1.0):
                away = self._conn.unreachable_for()
                if away >= self.service_timeout:
                    pending = list(self._futures)
                    break
                if away >= 5 and time.monotonic() - said >= 30:
                    said = time.monotonic()
                    log.warning("waiting for %d task(s); the service at %s has not been reachable for %.0f s "
                                "(giving up after %.0f s)", len(self._futures), self._info.url, away,
                                self.service_timeout)
            else:
                return
        error = ServiceUnreachable(
            f"the service at {self._info.url} has not been reachable for {away:.0f} s ({self._conn.down_reason}), "
            f"so the Executor stopped waiting for {len(pending)} task(s). Tasks it accepted run and keep their "
            f"results: once it is up, Executor(endpoint_id={self.endpoint_id!r}, "
            f"task_group_id={self.task_group_id!r}).reload() returns their futures")
        for fut in pending:
            fut._settle(exception=error)

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown(wait=True)
