"""The endpoint daemon: one outbound WebSocket to the service, an engine that runs the tasks,
and a spool that keeps results until the service has them.

``python -m tether.endpoint.run NAME`` runs it (``tether endpoint start`` does that);
the credential in ``$TETHER_HOME/endpoints/NAME/credential.json`` is the endpoint's own, issued
at registration, never the owner's token.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import platform
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from websockets.exceptions import ConnectionClosed

from tether import __version__
from tether.errors import PayloadTooLarge, SerializationError
from tether.ids import InvalidIdentifier, check_id
from tether.linger import Linger
from tether.protocol import (
    CLOSE_AUTH_FAILED,
    CLOSE_CREDENTIAL_ROTATED,
    DEFAULT_MAX_FRAME,
    ENDPOINT_WS_PATH,
    FRAME_ENVELOPE,
    MAX_IDS,
    TO_ENDPOINT_FRAMES,
    Cancel,
    Error,
    ErrorCode,
    Fetch,
    Fetched,
    FrameDecoder,
    Heartbeat,
    Hello,
    ProtocolError,
    Received,
    Release,
    Result,
    ResultAck,
    Running,
    Stop,
    Tasks,
    TaskState,
    TooLarge,
    Welcome,
    blob_ref_of,
    encode,
    wire_size,
)
from tether.results import cancelled, failure, result_frames, too_large
from tether.serialize import function_id, method_of
from tether.transport import Backoff, open_ws, send_now
from tether.urls import tls_context
from tether.versions import installed

from .config import EndpointConfig
from .credential import Credential
from .engines import TaskSpec, make_engine
from .engines.environment_router import with_environments
from .execute import Allowlist, arguments_refusal
from .functions import FunctionStore
from .inputs import InputFailed, Inputs
from .kept import KeptResults, keep_result, upload_kept
from .payloads import EndpointPayloads, blob_failure
from .spool import ResultSpool

log = logging.getLogger("tether.endpoint")

RESULT_CHUNK = 500
#: cancels remembered for tasks this daemon was not sent (yet), the most recent ones: on the
#: service a cancel can overtake its task (the task waits there for its function's body from
#: the store while the cancel goes straight out), and such a task is then dropped, not run
CANCELLED_UNSEEN_MAX = 10_000
FLUSH_WINDOW = 0.005  # seconds; see EndpointDaemon._finish
#: how often kept results are checked against kept_results_retention_s
KEPT_EXPIRE_EVERY_S = 600.0
#: how often inputs asked of the service and not answered yet are asked for again
INPUTS_ASK_AGAIN_S = 30.0
#: seconds the daemon holds its reports that tasks were received or started (see _flush_reports)
STATE_WINDOW = 0.005
#: holding more tasks than this (a backlog draining), results gather for DEEP_FLUSH_WINDOW:
#: they have waited in the queue far longer anyway, and fewer, larger frames cost the service
#: fewer commits
DEEP_QUEUE, DEEP_FLUSH_WINDOW = 256, 0.05


_frames = FrameDecoder(TO_ENDPOINT_FRAMES, "the service")


class CredentialRejected(RuntimeError):
    pass


class TaskRefused(Exception):
    """A task this endpoint will not run; the message says why (sent back as the task's error)."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """What the endpoint runs, for the heartbeat and for mismatch messages on the client side.

    Installed versions (not only imported modules): the plugins compare the endpoint's Parsl,
    Dask and Snakemake with the submitting side's before the first task runs.
    """
    return {**installed(("python", "cloudpickle", "parsl", "dask", "distributed", "snakemake")),
            "python_full": platform.python_version(), "tether": __version__, "platform": platform.platform()}


class EndpointDaemon:
    def __init__(self, config: EndpointConfig, credential: dict[str, str]):
        self.config = config
        self.credential = Credential(config.dir, credential)
        self.endpoint_id = self.credential.endpoint_id
        self.service_url = credential["service_url"].rstrip("/")
        # how the service's certificate is verified (https only): the CA it was registered with
        self.ssl_context = tls_context(self.service_url, credential.get("ca_file"))
        self.dir = config.dir
        self.sandbox_root = self.dir / "tasks"
        self.sandbox_root.mkdir(parents=True, exist_ok=True)
        self._sandbox_prefix = os.path.join(str(self.sandbox_root), "")  # "<root>/": + a task id is its sandbox
        self.spool = ResultSpool(self.dir / "spool")
        self.inflight: set[str] = set()
        self.peak_inflight = 0  # most tasks held at once (flow control keeps it <= workers + prefetch)
        self.functions = FunctionStore(self.dir / "functions")
        self.max_frame = DEFAULT_MAX_FRAME  # until the service's Welcome says what it accepts
        self.allowed_functions = set(config.allowed_functions) if config.allowed_functions is not None else None
        # arguments: the methods the administrator allows; function bodies: the same, except
        # that functions on the allow-list (checked by hash) may be pickled code
        # (JSON runs no code, so an endpoint that accepts pickles accepts JSON too)
        methods = set(config.allowed_serialization_methods)
        self.allowed_methods = frozenset(methods | ({"json"} if "cloudpickle" in methods else set()))
        self.engine_methods = self.allowed_methods | ({"cloudpickle"} if self.allowed_functions is not None else set())
        self.refused_functions: dict[str, str] = {}
        self.max_result = config.max_result_bytes
        # large payloads: fetched into (and spilled results written to) blobs/ (endpoint/payloads.py)
        self.payloads = EndpointPayloads(self.dir / "blobs", self.service_url, self.credential.headers,
                                         self.ssl_context, config.max_payload_bytes, config.max_result_bytes,
                                         credential.get("ca_file"))
        self.blob_threshold: int | None = None  # what the service announces; None: it keeps no blobs
        # large results stay here until released (endpoint/kept.py); tasks that take them as
        # inputs read them here (endpoint/inputs.py)
        kept_dir = Path(config.kept_results_dir).expanduser() if config.kept_results_dir else self.dir / "results"
        self.kept = KeptResults(kept_dir, config.kept_results_max_bytes, config.kept_results_retention_s)
        self._kept_expired = time.monotonic()
        self._inputs_asked = time.monotonic()
        self.inputs = Inputs(self.kept, self.payloads, self.inflight.__contains__, self._send_soon)
        self._fetching: set[str] = set()  # tasks whose blobs are being downloaded
        self._cancelled_unseen: dict[str, None] = {}  # see CANCELLED_UNSEEN_MAX (insertion-ordered)
        self._keep_over: dict[str, int] = {}  # tasks whose results stay here above a size of their own
        self.ws: Any = None
        self._queued_sends = 0  # frames in send tasks not yet written (see _send_soon)
        self.stopping = asyncio.Event()
        self.detaching = False  # stopping for a restart (SIGUSR1): see _restarting
        # reports not yet sent, task id -> when: "received" and "running" (see _flush_reports)
        self._reports: dict[str, dict[str, float]] = {"received": {}, "running": {}}
        self._reports_linger = Linger(self._flush_reports, STATE_WINDOW, eager=False)
        self._result_buf: list[Result] = []
        self._results_linger = Linger(self._flush, FLUSH_WINDOW)  # see _finish
        self.connected_since: float | None = None
        #: stop after this many seconds without a task (user endpoints of a multi-user endpoint)
        self.idle_exit_s: float | None = None
        self._last_activity = time.monotonic()

    # --- lifecycle -----------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGUSR1, self._restarting)
        self.engine = self._make_engine()
        await self.engine.start()
        # tasks the previous daemon's workers still run (or finished since): held here, so the
        # service neither sends them again nor waits for them (engines/adoption.py)
        self.inflight.update(t for t in self.engine.adopted() if t not in self.spool)
        self._write_status("starting")
        link = asyncio.create_task(self._link())
        beat = asyncio.create_task(self._heartbeats())
        stop = asyncio.create_task(self.stopping.wait())
        done, _ = await asyncio.wait({link, stop}, return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if link in done and link.exception() is not None:
            exc = link.exception()
            log.error("%s", exc)
            print(f"tether endpoint {self.config.name}: {exc}", file=sys.stderr)
            code = 2
        for task in (link, beat, stop):
            task.cancel()
        await self._before_stop()
        if self.detaching:  # a restart: the workers run on, the next daemon adopts them
            self._flush()  # (spooled, and acknowledged to an engine that keeps results until then)
            await self.engine.detach()
            self._flush()  # what they sent before detaching: spooled, sent by the next daemon
        else:
            await self.engine.stop()
        if self.ws is not None:
            await self.ws.close()
        self._write_status("stopped")
        return code

    def _restarting(self) -> None:
        """SIGUSR1 (``tether endpoint restart``): stop, leaving running tasks running."""
        log.info("restarting: running tasks stay with their workers for the next daemon")
        self.detaching = True
        self.stopping.set()

    def _make_engine(self) -> Any:
        engine = make_engine(
            self.config.engine, self._on_running, self._on_result,
            allowed_methods=Allowlist(data=self.allowed_methods, functions=frozenset(self.engine_methods)),
            retries_on_worker_loss=self.config.retries_on_worker_loss,
            python_sandbox=self.config.python_sandbox, state_dir=self.dir,
        )
        # tasks that ask for an environment of their own go to one (or fail saying how to allow it)
        return with_environments(engine, self.config)

    async def _before_stop(self) -> None:
        """Hook: what a subclass must do before the engine stops (the multi-user endpoint stops
        its user endpoints)."""

    def _on_frame(self, msg: Any) -> None:
        """Hook: frames only some endpoints act on (multi-user ones); others log them."""
        log.warning("ignoring a '%s' frame: this endpoint does not act on it", msg.__struct_config__.tag)

    def _write_status(self, state: str) -> None:
        status = {
            "pid": os.getpid(), "state": state, "endpoint_id": self.endpoint_id, "service": self.service_url,
            "connected_since": self.connected_since, "updated": time.time(),
            "capacity": self.engine.capacity() if state != "stopped" else {}, "versions": versions(),
            "inflight": len(self.inflight), "peak_inflight": self.peak_inflight, "spooled": len(self.spool),
            "kept_results": len(self.kept), "kept_bytes": self.kept.bytes,
        }
        tmp = self.dir / "status.json.tmp"
        tmp.write_text(json.dumps(status))
        os.replace(tmp, self.dir / "status.json")

    # --- the link to the service ----------------------------------------------------------------
    async def _link(self) -> None:
        self._backoff = backoff = Backoff(maximum=10.0)
        url = self.service_url.replace("http", "ws", 1) + ENDPOINT_WS_PATH
        headers = self.credential.headers()
        while not self.stopping.is_set():
            try:
                ws = await open_ws(url, headers, ssl_context=self.ssl_context)
            except Exception as exc:  # noqa: BLE001 - refused, DNS, timeout: all mean "try later"
                log.warning("cannot reach service %s: %s", self.service_url, exc)
                await asyncio.sleep(backoff.next())
                continue
            try:
                await self._session(ws)
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
                if code in (CLOSE_AUTH_FAILED, CLOSE_CREDENTIAL_ROTATED):
                    # rotated: 'tether endpoint rotate-credential' writes the new one just after
                    patience = 15.0 if code == CLOSE_CREDENTIAL_ROTATED else 0.0
                    if await self.credential.rotated(patience):
                        log.info("credential rotated; reconnecting with the new one")
                        headers = self.credential.headers()
                        continue
                    raise CredentialRejected(
                        f"the service rejected this endpoint's credential ({exc.rcvd.reason}); "
                        f"run 'tether endpoint start {self.config.name}' to register again"
                    ) from None
                log.warning("connection to service lost (%s); reconnecting", exc)
            except (OSError, ProtocolError) as exc:
                log.warning("connection to service failed (%s); reconnecting", exc)
            except CredentialRejected:
                raise
            except Exception:  # noqa: BLE001 - a bug must cost a reconnect, never a dead endpoint
                log.exception("unexpected error on the link to the service; reconnecting")
                await ws.close()
            finally:
                self.ws = None
                self.connected_since = None
                self._write_status("disconnected")
            if self.stopping.is_set():
                return
            await asyncio.sleep(backoff.next())

    async def _session(self, ws: Any) -> None:
        # what it holds, so the service does not send it again (capped so the frame fits any
        # service's limit: a task left out may be sent again, and is then recognised and skipped)
        await ws.send(encode(Hello(versions=versions(), capacity=self.engine.capacity(),
                                   inflight=list(self.inflight)[:MAX_IDS], spooled=self.spool.ids()[:MAX_IDS])))
        welcome = _frames.decode(await ws.recv())
        if isinstance(welcome, Error):
            raise CredentialRejected(f"service refused the endpoint: {welcome.message}")
        if not isinstance(welcome, Welcome):
            raise ProtocolError(f"expected 'welcome' from the service, got '{welcome.__struct_config__.tag}'")
        self.max_frame = welcome.max_frame
        self.blob_threshold = welcome.blob_threshold
        self.ws = ws
        self.connected_since = time.time()
        self._backoff.reset()
        log.info("connected to %s as endpoint %s", self.service_url, self.endpoint_id)
        self._write_status("connected")
        for batch in self._result_frames(self.spool.pending()):  # results from before the cut go first
            await ws.send(batch)
        self.inputs.resend()
        async for frame in ws:
            msg = _frames.decode(frame)
            if isinstance(msg, Tasks):
                self._on_tasks(msg)
            elif isinstance(msg, ResultAck):
                self.spool.ack(msg.ids)
            elif isinstance(msg, Cancel):
                for tid in msg.ids:
                    if tid in self._fetching:  # not in the engine yet: it never will be
                        self._fetching.discard(tid)
                        self.inflight.discard(tid)
                        self._keep_over.pop(tid, None)
                    elif tid in self.inflight:
                        self.engine.cancel(tid)
                    elif tid not in self.spool:
                        self._cancelled_unseen[tid] = None
                        if len(self._cancelled_unseen) > CANCELLED_UNSEEN_MAX:
                            del self._cancelled_unseen[next(iter(self._cancelled_unseen))]
            elif isinstance(msg, Stop):
                log.info("stop requested by the service")
                self.stopping.set()
                return
            elif isinstance(msg, Fetched):
                self.inputs.fetched(msg)
            elif isinstance(msg, Fetch):
                asyncio.ensure_future(self._serve_kept(msg.ids))
            elif isinstance(msg, Release):
                self.kept.release(msg.ids)
            elif isinstance(msg, Error):
                log.warning("service: %s (%s)", msg.message, msg.code)
            else:
                self._on_frame(msg)

    def _accept_functions(self, bodies: dict[str, bytes]) -> None:
        """Keep function bodies whose id is their hash; remember why others are refused."""
        for fid, body in bodies.items():
            if function_id(body) != fid:
                log.warning("refused function %s: its body does not hash to its id", fid)
                self.refused_functions[fid] = "its body does not hash to its id"
            else:
                self.functions.add(fid, body)

    def _check_task(self, task: Any) -> None:
        """Raise TaskRefused unless this endpoint's policy lets the task run."""
        fid = task.function
        if self.allowed_functions is not None and fid not in self.allowed_functions:
            raise TaskRefused(ErrorCode.UNKNOWN_FUNCTION, f"function {fid} is not in this endpoint's allowed_functions")
        if fid in self.refused_functions:
            raise TaskRefused(ErrorCode.FUNCTION_ID_MISMATCH, f"function {fid} refused: {self.refused_functions[fid]}")
        limit = self.config.max_payload_bytes
        if limit is not None and len(task.payload) > limit:  # inline; blobs are checked before they are fetched
            raise TaskRefused(ErrorCode.PAYLOAD_TOO_LARGE, f"arguments of task {task.id} are {len(task.payload)} "
                              f"bytes, over this endpoint's max_payload_bytes ({limit})")
        if blob_ref_of(task.payload) is None:  # a blob is checked once it is here (_fetch_then_run)
            self._check_arguments_method(method_of(task.payload))
        body = self.functions.get(fid)
        if body is not None and self.allowed_functions is None and blob_ref_of(body) is None \
                and method_of(body) not in self.allowed_methods:
            raise TaskRefused(ErrorCode.INVALID_REQUEST, f"function {fid} is pickled code, which this endpoint "
                              "accepts only for functions in its allowed_functions")

    def _check_arguments_method(self, method: str) -> None:
        """TaskRefused unless arguments serialized with ``method`` may be loaded here (the worker
        holds the same line: this is for the message)."""
        if method not in self.allowed_methods:
            raise TaskRefused(ErrorCode.INVALID_REQUEST, arguments_refusal(method, self.allowed_methods))

    def _on_tasks(self, msg: Tasks) -> None:
        self._last_activity = time.monotonic()
        self._accept_functions(msg.functions)
        now = time.time()
        received = self._reports["received"]
        for t in msg.tasks:
            tid = t.id
            received.setdefault(tid, now)
            if tid in self.inflight or tid in self.spool:
                continue  # a re-dispatch of a task we already hold: at-least-once, not twice at once
            if self._cancelled_unseen and tid in self._cancelled_unseen:  # its cancel came first
                del self._cancelled_unseen[tid]
                self.inflight.add(tid)
                self._finish(cancelled(tid, now))
                continue
            try:
                self._check_task(t)
                # a valid id has no separator and is no dot-name: it names a directory in the root
                # (a string join: pathlib's ``/`` and parent check cost ~10 us a task here)
                sandbox = f"{self._sandbox_prefix}{check_id(tid, 'task id')}"
            except (TaskRefused, InvalidIdentifier, SerializationError) as exc:
                oversize = isinstance(exc, TaskRefused) and exc.code == ErrorCode.PAYLOAD_TOO_LARGE
                self._on_result(blob_failure(tid, PayloadTooLarge(str(exc))) if oversize
                                else failure(tid, PermissionError(str(exc))))
                continue
            self.inflight.add(tid)
            if t.keep is not None:
                self._keep_over[tid] = t.keep
            body = self.functions.get(t.function)
            try:
                blob_refs = (blob_ref_of(t.payload), blob_ref_of(body))
            except ProtocolError as exc:
                self._on_result(failure(tid, PermissionError(str(exc))))
                continue
            if blob_refs != (None, None) or t.inputs:  # large arguments, function or inputs: fetched first
                self._fetching.add(tid)
                asyncio.ensure_future(self._fetch_then_run(t, body, sandbox, *blob_refs))
                continue
            self.engine.submit(TaskSpec(tid, t.function, body, t.payload, t.spec, sandbox))
        self.peak_inflight = max(self.peak_inflight, len(self.inflight))
        self._reports_linger.poke()

    # --- large payloads (blobs) ---------------------------------------------------------------------
    async def _fetch_then_run(self, task: Any, body: bytes | None, sandbox: str, args_ref: Any,
                              body_ref: Any) -> None:
        """Download a task's blobs, then hand it to the engine (unless it was cancelled meanwhile)."""
        tid = task.id
        inputs = None
        try:
            body, payload = await self.payloads.fetch(task, body, args_ref, body_ref, self.engine.workers_read_blobs)
            if task.inputs:
                inputs = await self.inputs.gather(tid, task.inputs)
        except InputFailed as exc:
            if tid in self._fetching:
                self._fetching.discard(tid)
                self._on_result(failure(tid, exc, message=str(exc), code=exc.code))
            return
        except Exception as exc:  # noqa: BLE001 - refused, corrupt, unreachable: this task fails, in words
            if tid in self._fetching:
                self._fetching.discard(tid)
                self._on_result(blob_failure(tid, exc))
            return
        if tid not in self._fetching:  # cancelled meanwhile
            self.payloads.discard(tid)
            self.inputs.done(tid)
            return
        self._fetching.discard(tid)
        if args_ref is not None and not self.engine.workers_read_blobs:  # (else the worker checks, as it reads)
            try:
                with open(self.payloads.args_path(tid), "rb") as fh:  # the header only, never the whole blob
                    self._check_arguments_method(method_of(fh.read(256)))
            except (TaskRefused, SerializationError, OSError) as exc:
                self.payloads.discard(tid)
                self._on_result(failure(tid, PermissionError(str(exc))))
                return
        self.engine.submit(TaskSpec(tid, task.function, body, payload, task.spec, sandbox, inputs))

    async def _keep_then_finish(self, result: Result) -> None:
        """Keep a large result here (its frame carries a kept stub); when the store is full, or
        the result is over ``max_result_bytes``, it goes the way results went before: a blob."""
        kept = await keep_result(self.kept, result, self.endpoint_id, self.max_result)
        if kept is not None:
            self._finish(kept)
        elif self.payloads.is_large(result.data, self.blob_threshold):
            await self._store_then_finish(result)
        else:  # small enough for a frame: it goes as it would have without keep_over
            self._finish(result)

    async def _serve_kept(self, ids: list[str]) -> None:
        """The service asks for kept results (a client wants the value, or a task on another
        endpoint takes it as input): uploaded as blobs of their owners, or said to be gone."""
        self._last_activity = time.monotonic()  # a user endpoint does not stop for idleness mid-upload
        async def answer(fetched: Fetched) -> None:
            await self._send(encode(fetched))

        await upload_kept(self.kept, self.payloads, self.endpoint_id, ids, answer)
        self._last_activity = time.monotonic()

    def _send_soon(self, frame: bytes) -> None:
        """Send ``frame`` after those already on their way: written now when none is (a result
        leaves in this loop iteration), else in a task of its own, in order."""
        ws = self.ws
        if ws is not None and not self._queued_sends and send_now(ws, frame):
            return
        self._queued_sends += 1
        asyncio.ensure_future(self._send_queued(frame))

    async def _send_queued(self, frame: bytes) -> None:
        try:
            await self._send(frame)
        finally:
            self._queued_sends -= 1

    async def _store_then_finish(self, result: Result) -> None:
        self._finish(await self.payloads.store_result(result))

    # --- engine callbacks (on the loop) ----------------------------------------------------------
    def _on_running(self, task_id: str, ts: float) -> None:
        if task_id in self.inflight:
            self._reports["running"].setdefault(task_id, ts)
            self._reports_linger.poke()

    def _flush_reports(self) -> None:
        """Send the "received" and "running" reports gathered for STATE_WINDOW.

        A task that ended meanwhile needs neither: its result carries both times (see
        :meth:`_finish`). So a quick task costs the service, the client and this daemon one
        frame (its result), not three, and a burst of reports becomes one frame per kind.
        """
        if self.ws is None:
            return  # re-derived on reconnect: the service knows what it sent, the hello says what is held
        for kind, frame_type in (("received", Received), ("running", Running)):
            pending = self._reports[kind]
            if not pending:
                continue
            self._reports[kind] = {}
            ids = list(pending)
            for start in range(0, len(ids), MAX_IDS):
                chunk = ids[start : start + MAX_IDS]
                ts = min(pending[tid] for tid in chunk)
                self._send_soon(encode(frame_type(ids=chunk, ts=ts)))

    def _on_result(self, result: Result) -> None:
        tid = result.id
        if tid in self.spool:
            self.engine.results_kept([tid])  # (an engine's second delivery: spooled already)
            return
        self.payloads.discard(tid)
        keep_over = self._keep_over.pop(tid, None) if self._keep_over else None
        data = result.data
        large = self.payloads.is_large(data, self.blob_threshold)
        if large or (keep_over is not None and data is not None and len(data) > keep_over):
            # kept here, or stored as a blob; the task stays in flight until then
            keep = result.state == TaskState.SUCCESS.value and self.kept.max_bytes > 0
            if keep:
                asyncio.ensure_future(self._keep_then_finish(result))
                return
            if large:
                asyncio.ensure_future(self._store_then_finish(result))
                return
        self._finish(result)

    def _finish(self, result: Result) -> None:
        """Spool and send a result (inline data, or a blob stub)."""
        tid = result.id
        self.inflight.discard(tid)
        received = self._reports["received"].pop(tid, None)  # not reported yet: the result says it
        if received is not None:
            result.times.setdefault(TaskState.DISPATCHED.value, received)
        self._reports["running"].pop(tid, None)  # the worker's own time is in the result
        if not self._reports["received"] and not self._reports["running"]:
            self._reports_linger.cancel()  # nothing left to report: no wake-up STATE_WINDOW from now
        data = result.data
        too_big = self.max_result is not None and data is not None and len(data) > self.max_result
        if too_big and result.state == TaskState.SUCCESS.value:
            result = failure(tid, ValueError(
                f"result is {len(data)} bytes, over this endpoint's max_result_bytes ({self.max_result})"
                " (PayloadTooLarge)"))
        elif wire_size(result) > self.max_frame - FRAME_ENVELOPE:  # spool what can be sent, never what cannot
            result = too_large(tid, TooLarge(result, wire_size(result), self.max_frame))
        self._result_buf.append(result)
        self.inputs.done(tid)
        self.inputs.produced(result)
        # the last result of a burst goes at once (latency); while other tasks still run, one
        # frame per window carries what streams in (every frame costs a spool write, a syscall
        # and a commit at the service), a longer window while a deep queue drains
        self._results_linger.poke(busy=bool(self.inflight),
                                  window=DEEP_FLUSH_WINDOW if len(self.inflight) > DEEP_QUEUE else FLUSH_WINDOW)

    def _flush(self) -> None:
        """Spool, then send, what the engine produced since the last flush, as one frame each.

        Spooled first, so that the result the service is sent is always the one this endpoint
        would send again after a crash: the service shows a client a result before it commits
        it, and were both killed in between, the result re-sent from the spool is the one the
        client saw (sent first, the task could run again and store another). Sending first
        measured no faster (0.97x paired, bench_hops)."""
        if self._result_buf:
            results, self._result_buf = self._result_buf, []
            self.spool.write(results)
            self.engine.results_kept([r.id for r in results])
            for frame in self._result_frames(results):
                self._send_soon(frame)

    def _result_frames(self, results: Iterable[Result]) -> Iterator[bytes]:
        """RESULT frames within the service's limits; a result too large for any frame is
        replaced by a failure that says so (the service acknowledges it, the spool drops it)."""
        return result_frames(results, self.max_frame, RESULT_CHUNK)

    async def _send(self, frame: bytes) -> None:
        ws = self.ws
        if ws is None:
            return  # spooled results are resent on reconnect; states are re-derived
        try:
            await ws.send(frame)
        except ConnectionClosed:
            pass

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            if self._idle_for_too_long():
                log.info("no task for %.0f s: stopping (idle_exit_s)", self.idle_exit_s)
                self.stopping.set()
                return
            self._write_status("connected" if self.ws is not None else "disconnected")
            if time.monotonic() - self._kept_expired > KEPT_EXPIRE_EVERY_S:
                self._kept_expired = time.monotonic()
                self.kept.expire()
            if self.ws is not None and time.monotonic() - self._inputs_asked > INPUTS_ASK_AGAIN_S:
                # inputs asked of the service and not answered (another replica stored them, say): again
                self._inputs_asked = time.monotonic()
                self.inputs.resend()
            if self.ws is not None:
                await self._send(encode(Heartbeat(capacity=self.engine.capacity(), versions=versions())))


    def _idle_for_too_long(self) -> bool:
        if self.idle_exit_s is None or self.inflight or len(self.spool):
            if self.inflight:
                self._last_activity = time.monotonic()
            return False
        return time.monotonic() - self._last_activity > self.idle_exit_s


__all__ = ["EndpointDaemon"]
