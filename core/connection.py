"""One WebSocket per client process (per service and identity), shared by every Executor in it.

A background thread runs an asyncio loop that owns the socket. User threads hand it tasks
through a deque and one wake-up call; the loop drains whatever has accumulated into one
SUBMIT frame (so batches form by themselves under load, and a lone task goes out at once),
keeps every frame that the service has not acknowledged, and after a reconnect resends those
(task ids make that idempotent) and re-subscribes to every task still pending. Results are
pushed by the service, never polled.

With several service replicas behind one URL (a balancer), the service may say which replica
holds an endpoint (``EndpointBrief.service``, its advertised URL): that endpoint's later tasks
go over a *direct* connection to that replica, so neither a task nor its result crosses the
broker between replicas (a hop each way, ~1-2 ms of a 3-4 ms round trip). A direct connection
that cannot reach its replica (or loses it) reconnects through the balancer instead and is
not steered to for DIRECT_AVOID_S: tasks then take the broker's path, as without steering.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import os
import ssl
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from websockets.exceptions import ConnectionClosed

from . import event_loop
from .bounded import BoundedCache
from .config import ServiceInfo
from .digest import digest_of
from .errors import (
    AuthError,
    PayloadTooLarge,
    QuotaExceeded,
    ResultLost,
    SerializationError,
    TaskRejected,
    TetherError,
    UnknownEndpoint,
    task_failed,
)
from .futures import TetherFuture, callbacks
from .home import tether_home
from .kept import KeptAsks
from .linger import Linger
from .protocol import (
    CLIENT_WS_PATH,
    CLOSE_AUTH_FAILED,
    DEFAULT_BLOB_THRESHOLD,
    DEFAULT_MAX_FRAME,
    MAX_BATCH,
    MAX_IDS,
    TO_CLIENT_FRAMES,
    BlobRef,
    Cancel,
    Collected,
    EndpointBrief,
    Error,
    ErrorCode,
    Fetched,
    FrameDecoder,
    KeptRef,
    ProtocolError,
    Refusal,
    Result,
    Results,
    Status,
    Submit,
    SubmitAck,
    Subscribe,
    Task,
    TaskState,
    TooLarge,
    Welcome,
    blob_ref_of,
    blob_stub,
    encode,
    kept_ref_of,
    task_frames,
    to_builtins,
)
from .refs import RemoteValue
from .serialize import deserialize, function_id
from .transfer import BlobClient
from .transport import Backoff, ThreadSender, open_ws, send_now
from .urls import check_transport
from .versions import Needed, differences

log = logging.getLogger("tether.client")

#: what a plain task needs alike on both sides: cloudpickled code loads only under the Python
#: minor version that pickled it (plugins add their own packages, see tether.versions)
PICKLED = (Needed("python", required=False),)

#: seconds cancels are gathered before they are sent (a loop of fut.cancel() becomes a few frames)
CANCEL_LINGER = 0.02

#: WebSocket close code of a peer that refused a frame as too big (RFC 6455)
CLOSE_MESSAGE_TOO_BIG = 1009

_frames = FrameDecoder(TO_CLIENT_FRAMES, "the service")

#: replicas one connection sends tasks to directly (distinct URLs), and endpoints it remembers a
#: replica of: beyond either, tasks go through the first connection (and the broker) as before
MAX_DIRECT = 16
MAX_STEERED = 65536
#: seconds a direct connection may take to open before its replica counts as unreachable, and how
#: long an unreachable (or lost) replica is not steered to
DIRECT_OPEN_TIMEOUT = 2.0
DIRECT_AVOID_S = 30.0


class Connection:
    """The process-wide link to one service for one token. Get it with :meth:`Connection.get`."""

    _instances: dict[tuple[int, str, str, str | None], Connection] = {}
    _lock = threading.Lock()

    @classmethod
    def get(cls, info: ServiceInfo, fallback: ServiceInfo | None = None) -> Connection:
        """The connection to ``info``'s service; ``fallback`` (for a direct connection to one
        replica) is where it connects instead when that replica cannot be reached."""
        key = (os.getpid(), info.url, info.token, info.ca_file)  # a forked child gets its own connection
        with cls._lock:
            conn = cls._instances.get(key)
            if conn is None or conn._closed:
                conn = cls._instances[key] = cls(info, fallback=fallback)
            return conn

    @classmethod
    def close_all(cls, url: str | None = None) -> None:
        """Close this process's connections (to ``url`` only, if given), e.g. before a service stops."""
        with cls._lock:
            for key, conn in list(cls._instances.items()):
                fallback = conn.fallback.url if conn.fallback is not None else None
                if url is None or url.rstrip("/") in (key[1], fallback):  # a direct connection goes with its service
                    conn.close()
                    del cls._instances[key]

    def __init__(self, info: ServiceInfo, batch_size: int = 512, batch_interval: float = 0.002,
                 fallback: ServiceInfo | None = None):
        self.info = info
        #: a direct connection to one replica: the service's URL (the balancer), used when the
        #: replica cannot be reached; None for a connection to the service itself
        self.fallback = fallback
        #: a direct connection: until when (time.monotonic) its replica is not steered to (it
        #: could not be reached, or the connection to it was lost)
        self.avoid_until = 0.0
        #: endpoint id -> the advertised URL of the replica holding it (its tasks go there directly)
        self._steer: dict[str, str] = {}
        self._steer_lock = threading.Lock()  # written from this and its direct connections' loops
        self.batch_size = batch_size
        self._linger = Linger(self._flush, batch_interval)  # tasks: at once when quiet, else gathered
        self._cancel_linger = Linger(self._flush, CANCEL_LINGER, eager=False)
        self.futures: dict[str, TetherFuture] = {}
        self.max_payload: int | None = None
        self.max_frame = DEFAULT_MAX_FRAME  # as the service announces it
        self.max_batch = MAX_BATCH
        self._refused_size: int | None = None  # a frame this size was refused: stay below it
        self.fatal: TetherError | None = None
        self._outbox: collections.deque[Task] = collections.deque()
        self._functions_to_send: dict[str, bytes] = {}
        # what the service has (forgetting one costs a resend of its body) and the bodies of recent
        # functions (to register again if the service lost one): bounded, however many functions
        self._known_functions: BoundedCache[str, None] = BoundedCache(max_items=65536)
        self._reregistered: set[str] = set()
        self._bodies: BoundedCache[str, bytes] = BoundedCache(max_items=1024, max_bytes=64 * 1024 * 1024)
        self._unacked: dict[int, Submit] = {}
        self.endpoint_versions: dict[str, dict[str, str]] = {}  # from the service, for plugins' checks
        self._refs = itertools.count(1)
        self._control: collections.deque[bytes] = collections.deque()
        #: ids cancelled since the last flush: one CANCEL frame per flush (per MAX_IDS), not per future
        self._cancels: collections.deque[str] = collections.deque()
        self._lock_cancels = threading.Lock()
        self._holding_cancels = 0  # > 0 inside batched_cancels(): cancels wait for its end
        #: frames sent, by type: what a mass cancel or a burst of submissions cost on the wire
        self.frames_sent: collections.Counter[str] = collections.Counter()
        self._collected: list[str] = []
        #: results kept on endpoints: fetches waiting for their answer, releases to send (core/kept.py)
        self._kept = KeptAsks(self.send_control)
        self._warned: set[Any] = set()
        self._python_of: dict[str, str | None] = {}  # endpoint -> the Python its last brief named
        self._wake_pending = False
        self._closed = False
        self._ws: Any = None
        self._thread_sender: ThreadSender | None = None  # a lone task's submission, written by its own thread
        self._queued_sends = 0  # frames in send tasks not yet written (see _send_soon)
        #: since when (time.monotonic) the service has not been reachable, and the last reason;
        #: None while connected (what a future that times out, or a waiting shutdown, says)
        self.down_since: float | None = time.monotonic()
        self.down_reason = "not connected yet"
        # large payloads: what the service sends as blobs, and the threads that move them (never the loop's)
        self.blob_threshold: int | None = DEFAULT_BLOB_THRESHOLD  # as the service announces it (None: no blobs)
        self._blob_client: BlobClient | None = None
        self._blob_lock = threading.Lock()
        self._function_blobs: dict[str, BlobRef] = {}  # function id of a large body -> its blob
        # blob id -> (function id, body), to upload a body again if its blob expired; the bodies are
        # the Executors' cached ones (shared, not copied)
        self._function_sources: BoundedCache[str, tuple[str, bytes]] = BoundedCache(max_items=256)
        self._transfers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tether-transfer")
        self._loop = event_loop.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="tether-connection", daemon=True)
        self._thread.start()

    @property
    def batch_interval(self) -> float:
        """Seconds submissions gather while earlier tasks are in flight (a lone task goes at once)."""
        return self._linger.window

    @batch_interval.setter
    def batch_interval(self, seconds: float) -> None:
        self._linger.window = seconds

    # --- called from user threads ------------------------------------------------------------
    def submit(self, task: Task, future: TetherFuture, function_body: bytes | None) -> None:
        """Queue a task; the background loop sends it with whatever else is waiting (on the
        direct connection to the replica holding its endpoint, when the service named one)."""
        if self.fatal is not None:
            raise self.fatal
        direct = self._direct_for(task.endpoint) if self._steer else None
        if direct is not None:
            if function_body is None and not direct.known_function(task.function):
                function_body = self._bodies.get(task.function)  # None: the service has it stored
            if future._on_cancel is not None:
                # its cancel follows its submission on one socket, in order: sent here, a cancel
                # could reach the service before the task and miss it
                future._on_cancel = direct.cancel
            direct.submit(task, future, function_body)
            return
        if self.max_payload is not None and len(task.payload) > self.max_payload:
            raise PayloadTooLarge(
                f"arguments serialize to {len(task.payload)} bytes; this service accepts at most "
                f"{self.max_payload} bytes per task"
            )
        fid = task.function
        if function_body is not None:
            self._bodies.setdefault(fid, function_body)
            if fid not in self._known_functions:
                self._functions_to_send[fid] = function_body
        self.futures[task.id] = future
        if self._send_from_thread(task):
            return
        self._outbox.append(task)
        self._wake()

    def _send_from_thread(self, task: Task) -> bool:
        """Write a lone task's submission from the submitting thread (see ThreadSender): only on
        a quiet line, where the loop would send it at once anyway (nothing else in flight,
        queued or about to be sent), so it overtakes nothing; False to hand it to the loop."""
        sender = self._thread_sender
        if (sender is None or self.down_since is not None or len(self.futures) != 1 or self._outbox
                or self._control or self._cancels or self._wake_pending or self._queued_sends):
            return False
        body = self._functions_to_send.get(task.function)
        frame = Submit(ref=next(self._refs), tasks=[task], functions={task.function: body} if body is not None else {})
        data = encode(frame)
        if len(data) > self._frame_limit():
            return False
        self._unacked[frame.ref] = frame  # before it is written: its acknowledgement may come at once
        if not sender.send(data):
            self._unacked.pop(frame.ref, None)
            return False
        if body is not None:
            self._functions_to_send.pop(task.function, None)
        self.frames_sent["submit"] += 1
        return True

    def _direct_for(self, endpoint_id: str) -> Connection | None:
        """The direct connection to the replica holding ``endpoint_id``, or None to send here:
        unknown, unreachable lately, or a connection that failed for good."""
        url = self._steer.get(endpoint_id)
        if url is None:
            return None
        direct = Connection.get(dataclasses.replace(self.info, url=url), fallback=self.info)
        if direct.fatal is not None or direct.avoid_until > time.monotonic():
            return None
        return direct

    def _learn_route(self, endpoint_id: str, url: str | None) -> None:
        """The service said which replica holds an endpoint (None: none, or it advertises no URL).
        Called on a connection's loop with what its acknowledgements say; a direct connection
        tells the connection it is the direct one of (its tasks were handed to it there)."""
        origin = self._origin()
        if origin is not self:
            origin._learn_route(endpoint_id, url)
            return
        url = url.rstrip("/") if url else None
        with self._steer_lock:
            if url is None or url == self.info.url.rstrip("/") or not self._may_steer_to(url):
                self._steer.pop(endpoint_id, None)
            elif endpoint_id in self._steer or len(self._steer) < MAX_STEERED:
                self._steer[endpoint_id] = url

    def _may_steer_to(self, url: str) -> bool:
        """Whether tasks may go to this replica URL: the token travels there, so never from https
        to plain http, nor to plain http beyond loopback unless allowed (``check_transport``);
        and to at most MAX_DIRECT replicas."""
        if self.info.url.startswith("https://") and not url.startswith("https://"):
            return False
        if not url.startswith(("https://", "http://")):
            return False
        try:
            check_transport(url)
        except TetherError:
            return False
        return url in self._steer.values() or len(set(self._steer.values())) < MAX_DIRECT

    def _origin(self) -> Connection:
        """The connection to the service itself that this direct connection serves (itself if it is one)."""
        if self.fallback is None:
            return self
        with Connection._lock:
            origin = Connection._instances.get((os.getpid(), self.fallback.url, self.fallback.token,
                                                self.fallback.ca_file))
        return origin if origin is not None else self

    def watch(self, futures: list[TetherFuture]) -> None:
        """Follow tasks submitted elsewhere (a reloaded task group)."""
        for fut in futures:
            self.futures.setdefault(fut.task_id, fut)
        ids = [f.task_id for f in futures]
        for start in range(0, len(ids), MAX_IDS):
            self.send_control(encode(Subscribe(ids=ids[start : start + MAX_IDS])))

    def cancel(self, task_id: str) -> None:
        """Cancel a task at the service; cancels made together travel as one frame."""
        self.futures.pop(task_id, None)
        self._cancels.append(task_id)  # a deque: user threads append while the loop drains it
        self._wake()

    @contextlib.contextmanager
    def batched_cancels(self) -> Iterator[None]:
        """Cancels made inside this block leave together, a frame per MAX_IDS ids, when it ends
        (``Executor.shutdown(cancel_futures=True)`` cancels everything pending this way)."""
        with self._lock_cancels:
            self._holding_cancels += 1
        try:
            yield
        finally:
            with self._lock_cancels:
                self._holding_cancels -= 1
            self._wake()

    def send_control(self, frame: bytes) -> None:
        self._control.append(frame)
        self._wake()

    def known_function(self, fid: str) -> bool:
        return fid in self._known_functions

    # --- large payloads (blobs) ----------------------------------------------------------------
    def blobs(self) -> BlobClient:
        """The HTTP client for this service's blob routes (made on first use)."""
        with self._blob_lock:
            if self._blob_client is None:
                self._blob_client = BlobClient(self.info.url, {"Authorization": f"Bearer {self.info.token}"},
                                               self.info.ssl_context())
            return self._blob_client

    def function_blob(self, fid: str, body: bytes, progress: bool | None) -> BlobRef:
        """The blob holding a function body too large for frames, uploaded once per process."""
        with self._blob_lock:
            ref = self._function_blobs.get(fid)
        if ref is None:
            ref = self.blobs().upload(body, len(body), digest_of(body), what=f"function {fid}", progress=progress)
            with self._blob_lock:
                ref = self._function_blobs.setdefault(fid, ref)
                self._function_sources[ref.id] = (fid, body)
        return ref

    def _reupload_function(self, task: Task, fut: TetherFuture) -> bool:
        """A task was refused because the blob of its function's body expired with the tasks that
        named it (their retention ended while this process kept using the function): upload the
        body again and resubmit the task, once. False if this task names no such blob."""
        with self._blob_lock:
            stale = [(b, self._function_sources.get(b)) for b in task.blobs]
            stale = [(b, source) for b, source in stale if source is not None]
            for _, (fid, _body) in stale:
                self._function_blobs.pop(fid, None)
        if not stale or task.id in self._reregistered:
            return False
        self._reregistered.add(task.id)
        old_blob, (fid, body) = stale[0]

        def again() -> None:
            try:
                ref = self.function_blob(fid, body, fut.progress)
                stub = blob_stub(ref)
                task.function = function_id(stub)
                task.blobs = [b for b in task.blobs if b != old_blob] + [ref.id]
                self.submit(task, fut, stub)
            except Exception as exc:  # noqa: BLE001 - the future says why
                if not fut.done():
                    fut._settle(exception=exc if isinstance(exc, TetherError) else TetherError(
                        f"task {task.id}: uploading its function again failed: {type(exc).__name__}: {exc}"))

        self.in_background(again)
        return True

    def in_background(self, fn: Any, *args: Any) -> None:
        """Run a transfer on the connection's transfer threads (uploads, result downloads)."""
        self._transfers.submit(fn, *args)

    def _fetch_result(self, fut: TetherFuture, ref: BlobRef) -> None:
        """Download a result stored as a blob, check it, and resolve its future."""
        try:
            value = self.blobs().load(ref, what=f"result of task {fut.task_id}", progress=fut.progress)
        except TetherError as exc:
            fut._settle(exception=exc)
        except Exception as exc:  # noqa: BLE001 - the network or the disk: the future says so
            fut._settle(exception=TetherError(f"task {fut.task_id}: fetching its result ({ref.size} bytes) failed: "
                                              f"{type(exc).__name__}: {exc}"))
        else:
            fut._settle(value)

    # --- results kept on endpoints -------------------------------------------------------------
    def kept_value(self, task_id: str, kept: KeptRef) -> RemoteValue:
        """The handle of a result its endpoint keeps: fetched on demand, released when dropped.
        A direct connection's handles are its service connection's: passed to another task, they
        are recognised as this service's (``Executor._as_input``) and travel as a reference."""
        owner = self._origin()
        return RemoteValue(task_id, kept.endpoint, kept.size, owner.fetch_kept, owner._kept.released.append, kept.type)

    def fetch_kept(self, task_id: str, timeout: float | None = None, progress: bool | None = None) -> Any:
        """The value of a kept result: asked for through the service (the endpoint uploads it as a
        blob), downloaded here (the service checked its digest on arrival) and deserialized.
        Concurrent asks share one fetch."""
        if self.fatal is not None:
            raise self.fatal
        try:
            data = self._kept.ask(task_id).result(timeout)
            self._collected.append(task_id)  # the user has it now: its retention starts
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"task {task_id}: its result, kept on its endpoint, did not arrive within "
                               f"{timeout:g} s{self.why_waiting()}") from None
        ref = blob_ref_of(data)
        if ref is None:
            return deserialize(data)
        return self.blobs().load(ref, what=f"result of task {task_id}", progress=progress)

    def unreachable_for(self) -> float:
        """Seconds the service has been out of reach (0 while connected)."""
        since = self.down_since
        return 0.0 if since is None else time.monotonic() - since

    def why_waiting(self) -> str:
        """What keeps results from arriving, when it is the connection; else ''."""
        if self.fatal is not None:
            return f"; the connection to {self.info.url} ended: {self.fatal}"
        away = self.unreachable_for()
        if not away:
            return ""
        return (f"; the service at {self.info.url} has not been reachable for {away:.0f} s ({self.down_reason}): "
                "the client keeps trying, and results wait on the service meanwhile")

    def close(self) -> None:
        """Stop the background loop; pending futures stay pending (their results stay on the service)."""
        self._closed = True
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            self._thread.join(timeout=5)

    async def _shutdown(self) -> None:
        self._send_collected()
        self._flush()  # cancels and tasks still gathering go out before the socket closes
        if self._ws is not None:
            await asyncio.sleep(0)  # let the frame queued above go out
            await self._ws.close()
        current = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not current]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self._loop.stop()

    def _wake(self) -> None:
        if not self._wake_pending:
            self._wake_pending = True
            try:
                self._loop.call_soon_threadsafe(self._woken)
            except RuntimeError:  # loop closed at interpreter exit
                pass

    def _woken(self) -> None:
        """Send now if the line was quiet; if a batch just left, gather for ``batch_interval``.

        A lone task goes out at once (latency); a stream of submissions, while earlier tasks
        are still in flight, becomes a few large frames (throughput: each frame is a commit at
        the service and a syscall on each side).
        """
        if self._cancels and not self._outbox and not self._control:
            # cancels are never urgent to the millisecond: gather a loop of fut.cancel() calls
            self._cancel_linger.poke()
        else:
            self._linger.poke(busy=len(self.futures) > len(self._outbox))

    # --- the background loop -----------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        callbacks.owner_threads.add(threading.get_ident())  # user callbacks never run here
        self._loop.create_task(self._maintain())
        self._loop.create_task(self._collect_loop())
        try:
            self._loop.run_forever()
        finally:
            self._closed = True
            callbacks.owner_threads.discard(threading.get_ident())  # the ident may be reused

    async def _maintain(self) -> None:
        backoff = Backoff()
        headers = {"Authorization": f"Bearer {self.info.token}"}
        warned = False
        while not self._closed:
            # a direct connection tries its replica first, briefly; when that replica is away, the
            # service's own URL (its balancer sends the connection to a live replica)
            direct = self.fallback is not None and self.avoid_until <= time.monotonic()
            info = self.info if self.fallback is None or direct else self.fallback
            url = info.ws_url + CLIENT_WS_PATH
            try:
                try:
                    ws = await open_ws(url, headers, ssl_context=info.ssl_context(),
                                       open_timeout=DIRECT_OPEN_TIMEOUT if direct else None)
                except Exception as exc:
                    if not direct:
                        raise
                    self._leave_replica(f"cannot reach it ({type(exc).__name__}: {exc})")
                    continue
            except ssl.SSLCertVerificationError as exc:  # retrying cannot help: say so at once
                self._fail_all(TetherError(
                    f"the TLS certificate of {self.info.url} cannot be verified ({exc.verify_message}); if it is "
                    "signed by a private CA, set TETHER_CA_FILE to that CA's bundle"))
                return
            except (OSError, TimeoutError, ConnectionClosed) as exc:
                self.down_reason = str(exc) or type(exc).__name__
                if not warned:
                    log.warning("cannot reach Tether service at %s (%s); retrying", self.info.url, exc)
                    warned = True
                await asyncio.sleep(backoff.next())
                continue
            except Exception as exc:  # noqa: BLE001 - e.g. HTTP rejection
                log.warning("connection to %s failed: %s; retrying", self.info.url, exc)
                await asyncio.sleep(backoff.next())
                continue
            try:
                welcome = _frames.decode(await ws.recv())
                if isinstance(welcome, Error) and direct:  # not this deployment's replica, somehow
                    await ws.close()
                    continue  # left in the finally below: through the service's own URL
                if isinstance(welcome, Error):
                    self._fail_all(AuthError(welcome.message or "authentication failed"))
                    await ws.close()
                    return
                if not isinstance(welcome, Welcome):
                    raise ProtocolError(f"expected 'welcome' from the service, got '{welcome.__struct_config__.tag}'")
                self.max_payload = welcome.max_payload
                self.max_frame = welcome.max_frame
                self.max_batch = welcome.max_batch
                self.blob_threshold = welcome.blob_threshold
                backoff.reset()
                warned = False
                self._ws = ws
                await self._resume()
                self.down_since = None
                self._wake_pending = False
                self._flush()
                self._thread_sender = ThreadSender.install(ws, self._loop)
                async for frame in ws:
                    self._handle(frame)
            except ConnectionClosed as exc:
                if exc.rcvd is not None and exc.rcvd.code == CLOSE_AUTH_FAILED and not direct:
                    self._fail_all(AuthError(exc.rcvd.reason or "authentication failed"))
                    return
                if exc.rcvd is not None and exc.rcvd.code == CLOSE_MESSAGE_TOO_BIG:
                    self._frame_refused()
            except (OSError, ProtocolError) as exc:
                log.warning("connection to %s lost: %s", self.info.url, exc)
            except Exception:  # noqa: BLE001 - a bug must cost a reconnect, never a silent hang
                log.exception("unexpected error on the connection to %s; reconnecting", self.info.url)
                await ws.close()
            finally:
                self._ws = None
                if self._thread_sender is not None:
                    self._thread_sender.close()
                    self._thread_sender = None
                if self.down_since is None:
                    self.down_since, self.down_reason = time.monotonic(), "the connection was lost"
                if direct:  # its replica stopped (or drains): reconnect through the service's URL at once
                    self._leave_replica("the connection to it was lost")
            if not self._closed:
                log.info("reconnecting to %s", self.info.url)
                await asyncio.sleep(backoff.next())

    def _leave_replica(self, why: str) -> None:
        """A direct connection's replica is away: connect through the service's URL instead, and
        send no new task this way for DIRECT_AVOID_S (they go through the first connection)."""
        self.avoid_until = time.monotonic() + DIRECT_AVOID_S
        log.info("replica %s: %s; connecting through %s", self.info.url, why,
                 self.fallback.url if self.fallback is not None else "")

    def _frame_limit(self) -> int:
        limit = self.max_frame
        return limit if self._refused_size is None else min(limit, self._refused_size - 1)

    def _frame_refused(self) -> None:
        """The service closed the link on a frame too big for it (its limit is below what it
        announced): stay below the largest frame it may have refused, so resending converges."""
        sizes = [len(encode(f)) for f in list(self._unacked.values())]
        if sizes:
            self._refused_size = min(max(sizes), self._refused_size or max(sizes))
            log.warning("the service refused a %d-byte frame; sending smaller frames", self._refused_size)

    async def _resume(self) -> None:
        """After (re)connecting: resend unacknowledged batches (re-cut if they no longer fit the
        service's frame limit), re-follow every pending task."""
        requeue: list[Task] = []
        for ref in sorted(self._unacked):
            frame = self._unacked[ref]
            data = encode(frame)
            if len(data) > self._frame_limit():
                del self._unacked[ref]
                requeue.extend(frame.tasks)
                self._functions_to_send.update(frame.functions)
                continue
            # sent by tasks, in order, never awaited here: the reading loop must start at once, or
            # with megabytes to resend neither side reads and both wait on full socket buffers
            self._send_soon(data, "submit")
        self._outbox.extendleft(reversed(requeue))
        unacked_ids = {t.id for frame in list(self._unacked.values()) for t in frame.tasks}
        # list() copies in one step: user threads append to the deque while this runs
        queued_ids = {t.id for t in list(self._outbox)}
        follow = [tid for tid in list(self.futures) if tid not in unacked_ids and tid not in queued_ids]
        for start in range(0, len(follow), MAX_IDS):
            self._send_soon(encode(Subscribe(ids=follow[start : start + MAX_IDS])))
        for frame in self._kept.frames_to_resend():  # asked before the cut: ask again
            self._send_soon(frame)

    def _flush(self) -> None:
        """Drain queued control frames and tasks into frames on the socket (runs on the loop)."""
        ws = self._ws
        if ws is None:
            # sent by _resume once connected; the wake-up stays pending meanwhile, so queued
            # submissions do not each cost a wake-up of this loop (a syscall) while it is away
            return
        self._wake_pending = False
        if self._outbox:
            self._linger.sent()
            tasks = [self._outbox.popleft() for _ in range(len(self._outbox))]
            limit, count = self._frame_limit(), min(self.batch_size, self.max_batch)
            for batch in task_frames(tasks, self._functions_to_send.get, limit, count):
                if isinstance(batch, TooLarge):
                    self._fail_task(batch.item.id, PayloadTooLarge(batch.message(
                        f"task {batch.item.id} (arguments and function body)")))
                    continue
                batch, functions = batch
                for fid in functions:
                    self._functions_to_send.pop(fid, None)
                frame = Submit(ref=next(self._refs), tasks=batch, functions=functions)
                self._unacked[frame.ref] = frame
                self._send_soon(encode(frame), "submit")
        # control frames (cancel, subscribe) after the tasks they may refer to: frames arrive in order
        while self._control:
            self._send_soon(self._control.popleft())
        if self._cancels and not self._holding_cancels:
            cancels = [self._cancels.popleft() for _ in range(len(self._cancels))]  # never a swap: an
            # append racing a swap would land in the list already sent
            for start in range(0, len(cancels), MAX_IDS):
                self._send_soon(encode(Cancel(ids=cancels[start : start + MAX_IDS])), "cancel")

    def _fail_task(self, task_id: str, exc: TetherError) -> None:
        fut = self.futures.pop(task_id, None)
        if fut is not None:
            fut._settle(exception=exc)

    def _send_soon(self, frame: bytes, kind: str = "control") -> None:
        """Send ``frame`` after those already on their way: written now when none is (a lone
        task's submission leaves in this loop iteration), else in a task of its own, in order.
        Never waits: the reading loop must go on (with megabytes to send, neither side reading
        would leave both waiting on full socket buffers)."""
        ws = self._ws
        if ws is not None and not self._queued_sends and send_now(ws, frame):
            self.frames_sent[kind] += 1
            return
        self._queued_sends += 1
        self._loop.create_task(self._send(frame, kind))

    async def _send(self, frame: bytes, kind: str = "control") -> None:
        try:
            ws = self._ws
            if ws is None:
                return
            try:
                await ws.send(frame)
            except ConnectionClosed:
                return  # _maintain reconnects; unacked batches are resent from there
            self.frames_sent[kind] += 1
        finally:
            self._queued_sends -= 1

    def _handle(self, frame: bytes) -> None:
        msg = _frames.decode(frame)
        if isinstance(msg, Results):
            self._on_results(msg.results)
        elif isinstance(msg, Status):
            for tid, state, ts in msg.updates:
                fut = self.futures.get(tid)
                if fut is None:
                    continue
                fut._record(state, ts)
                if state == TaskState.RUNNING:
                    fut._mark_running()
        elif isinstance(msg, SubmitAck):
            self._on_ack(msg)
        elif isinstance(msg, Fetched):
            self._kept.answered(msg)
        elif isinstance(msg, Error):
            self._on_error(msg)

    def _on_ack(self, msg: SubmitAck) -> None:
        for endpoint_id, brief in msg.endpoints.items():
            self._check_endpoint(endpoint_id, brief)
            self._learn_route(endpoint_id, brief.service)
        batch = self._unacked.pop(msg.ref, None) if msg.ref is not None else None
        if batch is not None:
            self._known_functions.update(batch.functions)
        for tid in msg.accepted:
            fut = self.futures.get(tid)
            if fut is not None and fut.state == TaskState.RECEIVED:
                fut._record(TaskState.RECEIVED.value, msg.ts)
                fut._record(TaskState.WAITING.value, msg.ts)
        retry = []
        for tid, refusal in msg.rejected.items():
            task = next((t for t in batch.tasks if t.id == tid), None) if batch else None
            if refusal.code == ErrorCode.UNKNOWN_FUNCTION and task is not None and task.function in self._bodies \
                    and tid not in self._reregistered:
                # the service lost the function (its database was replaced): register it again, once
                self._reregistered.add(tid)
                self._known_functions.discard(task.function)
                self._functions_to_send[task.function] = self._bodies[task.function]
                retry.append(task)
                continue
            fut = self.futures.pop(tid, None)
            if refusal.code == ErrorCode.UNKNOWN_BLOB and task is not None and fut is not None \
                    and self._reupload_function(task, fut):
                continue
            if fut is not None:
                fut._settle(exception=_rejection(refusal))
        if retry:
            self._outbox.extend(retry)
            self._flush()

    def _check_endpoint(self, endpoint_id: str, brief: EndpointBrief) -> None:
        """Say once, in words, what will go wrong on an endpoint before its tasks fail."""
        self.endpoint_versions[endpoint_id] = brief.versions
        if self._python_of.get(endpoint_id, "?") == brief.python:
            python = None  # compared at an earlier acknowledgement (every one carries the brief)
        else:
            self._python_of[endpoint_id] = brief.python
            python = differences(PICKLED, {"python": brief.python} if brief.python else {})
        if python and endpoint_id not in self._warned:
            self._warned.add(endpoint_id)
            text = (f"endpoint {endpoint_id} runs Python {python[0].there} but this client runs Python "
                    f"{python[0].here}: functions pickled here will fail to load there. Use the same Python "
                    "minor version, or ask for a matching environment where the endpoint builds them "
                    "(Executor(..., environment='match'), docs/environments.md).")
            log.warning(text)
            warnings.warn(text, RuntimeWarning, stacklevel=2)
        if not brief.online and ("offline", endpoint_id) not in self._warned:
            self._warned.add(("offline", endpoint_id))
            log.info("endpoint %s is offline: tasks wait for it (state waiting-for-endpoint)", endpoint_id)

    def _on_error(self, msg: Error) -> None:
        text = msg.message or "error from service"
        if msg.ref is not None:
            batch = self._unacked.pop(msg.ref, None)
            for t in batch.tasks if batch else ():
                fut = self.futures.pop(t.id, None)
                if fut is not None:
                    fut._settle(exception=TaskRejected(text))
        for tid in msg.ids or ():
            fut = self.futures.pop(tid, None)
            if fut is not None:
                fut._settle(exception=_rejection(Refusal(msg.code, f"task {tid}: {text}")))
        if msg.ref is None and not msg.ids:
            log.warning("service: %s", text)

    def _on_results(self, results: list[Result]) -> None:
        for r in results:
            tid = r.id
            fut = self.futures.pop(tid, None)
            if r.state != TaskState.SUCCESS or kept_ref_of(r.data) is None:
                # a kept result is collected when it is fetched (its retention starts then), not now
                self._collected.append(tid)
            if fut is None or fut.done():
                continue
            for state, ts in r.times.items():
                fut._record(state, ts)
            fut._record(r.state, None)
            # settled with one check-and-set: a cancel racing this result wins or loses cleanly
            if r.state == TaskState.SUCCESS:
                try:
                    kept = kept_ref_of(r.data)
                    if kept is not None:  # it stays on its endpoint: result() fetches it when asked
                        fut._settle_kept(self.kept_value(tid, kept))
                        continue
                    ref = blob_ref_of(r.data)
                    if ref is not None:  # a large result: fetched off the loop, then the future resolves
                        self.in_background(self._fetch_result, fut, ref)
                        continue
                    fut._settle(deserialize(r.data) if r.data is not None else None)
                except (SerializationError, ProtocolError) as exc:
                    fut._settle(exception=exc)
            elif r.state == TaskState.CANCELLED:
                fut._cancelled_remotely()
            elif r.error is not None and r.error.code == ErrorCode.PAYLOAD_TOO_LARGE:
                fut._settle(exception=PayloadTooLarge(f"task {tid}: {r.error.message}"))
            elif r.error is not None and r.error.code == ErrorCode.QUOTA_EXCEEDED:
                fut._settle(exception=QuotaExceeded(f"task {tid}: {r.error.message}"))
            elif r.error is not None and r.error.code in (ErrorCode.RESULT_LOST, ErrorCode.ENDPOINT_OFFLINE):
                fut._settle(exception=ResultLost(f"task {tid}: {r.error.message}"))
            else:
                original = None
                if r.data:
                    try:
                        original = deserialize(r.data)
                    except Exception:  # noqa: BLE001 - the text form below is enough
                        original = None
                fut._settle(exception=task_failed(to_builtins(r.error) if r.error else {}, original, tid))
        if len(self._collected) >= 1000:
            self._send_collected()

    def _send_collected(self) -> None:
        """Tell the service which results the user has (its retention clock starts); batched."""
        collected, self._collected = self._collected, []
        for start in range(0, len(collected), MAX_IDS):
            self.send_control(encode(Collected(ids=collected[start : start + MAX_IDS])))
        for frame in self._kept.release_frames():
            self.send_control(frame)

    async def _collect_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self._send_collected()

    def _fail_all(self, exc: TetherError) -> None:
        self.fatal = exc
        self._closed = True
        futures, self.futures = self.futures, {}
        for fut in futures.values():
            fut._settle(exception=exc)
        self._kept.fail_all(exc)


#: spill files older than this were left by a process that died mid-transfer
SPILL_STALE_S = 24 * 3600
_swept: set[Path] = set()


def spill_dir() -> Path:
    """Where the client keeps large payloads on their way (``TETHER_SPILL_DIR``, or
    ``$TETHER_HOME/spill``: on disk, not in a tmpfs that would hold them in memory). Files a
    crashed process left there are swept once per process."""
    path = Path(os.environ.get("TETHER_SPILL_DIR") or tether_home() / "spill")
    if path not in _swept:  # made here once; who writes into it makes it again if it went meanwhile
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        _swept.add(path)
        cutoff = time.time() - SPILL_STALE_S
        for old in path.iterdir():
            with contextlib.suppress(OSError):
                if old.stat().st_mtime < cutoff:
                    old.unlink()
    return path


atexit.register(Connection.close_all)  # close sockets cleanly instead of dying mid-frame at exit


def _rejection(refusal: Refusal) -> TetherError:
    """Turn the service's refusal of a task into the matching typed error (by code, not by text)."""
    cls = {
        ErrorCode.PAYLOAD_TOO_LARGE: PayloadTooLarge,
        ErrorCode.UNKNOWN_ENDPOINT: UnknownEndpoint,
        ErrorCode.ENDPOINT_DELETED: UnknownEndpoint,
        ErrorCode.QUOTA_EXCEEDED: QuotaExceeded,
    }.get(refusal.code, TaskRejected)
    return cls(refusal.message)


__all__ = ["Connection"]
