"""The htex and mpi engines as the daemon sees them: Parsl runs in the endpoint's engine host
(``host.py``), a process of its own that outlives the daemon, and this engine forwards to it.

At start the engine attaches to the host an earlier daemon left running, or starts one. A host
that holds tasks is adopted as it is, whatever this daemon's configuration (the tasks keep
running: a configuration or release changed since applies from the next ``stop``/``start``); an
idle one built differently, a failed one or one speaking another wire version is stopped and a
fresh one started. The tasks the host holds are reported as adopted (the daemon tells the
service it holds them), the results no daemon acknowledged are delivered, and from then on
tasks, cancels and capacity questions go over the socket, results and RUNNING reports come back.

A result is acknowledged to the host once the daemon has spooled it (:meth:`results_kept`): a
daemon killed between the two loses nothing, the next one gets it again. ``detach`` (restart)
only closes the connection; ``stop`` has the host stop the engine (batch jobs cancelled,
leftovers killed), waits for it to exit, and kills it if it does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from tether import __version__
from tether.errors import TetherError
from tether.processes import is_recorded_process, signal_and_wait
from tether.protocol import Result
from tether.results import failure

from ..base import Engine, TaskSpec
from .config import provider_spec, validate_engine
from .hostwire import (
    LOCK_NAME,
    LOG_NAME,
    PID_NAME,
    WIRE_VERSION,
    Ack,
    AskCapacity,
    Attach,
    Attached,
    CancelTasks,
    Capacity,
    Done,
    Gather,
    HostArgs,
    Shutdown,
    Started,
    Stopped,
    Submit,
    frame,
    read_frame,
    socket_path,
    to_daemon,
)

log = logging.getLogger("tether.endpoint.parsl")

HOST_MODULE = "tether.endpoint.engines.parsl.host"
#: seconds a host may take to start Parsl (the interchange, the first scaling step) and listen
HOST_START_S = 120.0
#: seconds the host's stop may take (Parsl's shutdown is given 60 s, leftovers 5 s)
HOST_STOP_S = 90.0
#: acknowledgements of spooled results gather for this long (one frame, one wake-up of the host)
ACK_WINDOW_S = 0.05
#: how stale the capacity figures may be before the host is asked again
CAPACITY_EVERY_S = 0.5


class HostedParslEngine(Engine):
    """``htex`` / ``mpi`` through the engine host (see the module's docstring)."""

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.kind: str = self.config.get("type", "htex")
        validate_engine(self.config, self.config.get("_source", "engine config"))  # in words, before any host
        assert self.state_dir is not None
        self.dir = Path(self.state_dir)
        self.held: set[str] = set()  # handed to the host, no result yet
        self._delivered: set[str] = set()  # results from the host, not acknowledged yet
        #: the tasks of one loop turn travel in one frame; acknowledgements gather for ACK_WINDOW_S
        self._tasks_out: Gather[TaskSpec] = Gather(lambda tasks: self._write(Submit(tasks)))
        self._acks: Gather[str] = Gather(lambda ids: self._write(Ack(ids)), ACK_WINDOW_S)
        self._cap: dict[str, Any] = {}
        self._cap_asked = 0.0
        self._stopped = asyncio.Event()
        self.stopping = False
        self.failed_state: str | None = None
        self.writer: asyncio.StreamWriter | None = None
        args = self._host_args()
        reader, self.writer, attached = await self._attach(args)
        self.host_pid = attached.pid
        self.run_mark = attached.run_mark
        self._cap = attached.capacity
        self.held.update(attached.held)
        self._adopted = set(attached.held) | {r.id for r in attached.results}
        if self._adopted:
            log.info("adopted %d task(s) and %d result(s) from the engine host (pid %d)",
                     len(attached.held), len(attached.results), attached.pid)
        # reported once the daemon holds them (it does right after start returns)
        self.loop.call_soon(self._deliver_adopted, attached)
        self._reading = asyncio.ensure_future(self._read(reader))

    def adopted(self) -> set[str]:
        return set(self._adopted)

    def _deliver_adopted(self, attached: Attached) -> None:
        for tid, ts in attached.running.items():
            self.on_running(tid, ts)
        for result in attached.results:
            self._result(result)

    def _host_args(self) -> HostArgs:
        allowed = self.allowed_methods
        plain = sorted(allowed) if isinstance(allowed, frozenset) else None
        data = funcs = None
        if allowed is not None and plain is None:
            data = None if allowed.data is None else sorted(allowed.data)
            funcs = None if allowed.functions is None else sorted(allowed.functions)
        body = (self.config, data, funcs, plain, self.retries_on_worker_loss, self.python_sandbox,
                str(self.state_dir), __version__, sys.executable, WIRE_VERSION)
        key = hashlib.sha256(msgspec.msgpack.encode(body)).hexdigest()[:16]
        return HostArgs(self.config, data, funcs, plain, self.retries_on_worker_loss, self.python_sandbox,
                        str(self.state_dir), key)

    # --- finding (or starting) the host ---------------------------------------------------------------
    async def _attach(self, args: HostArgs) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Attached]:
        """Attach to the host an earlier daemon left, or start one; stop a host not fit to adopt."""
        proc: subprocess.Popen[bytes] | None = None
        deadline = time.monotonic() + HOST_START_S
        while True:
            conn = await self._connect(args.key)
            if conn is not None:
                reader, writer, attached = conn
                why = self._unfit(attached, args)
                if why is None:
                    if attached.key != args.key:
                        log.warning("the engine host (pid %d) was started with another configuration or release; "
                                    "it holds %d task(s), so it is kept: the change applies after "
                                    "'tether endpoint stop' and 'start'", attached.pid, len(attached.held))
                    return reader, writer, attached
                log.info("stopping the engine host (pid %d): %s", attached.pid, why)
                await self._shutdown_host(reader, writer, attached.pid)
                proc = None
                deadline = time.monotonic() + HOST_START_S
                continue
            if proc is not None and proc.poll() is not None:
                raise TetherError(f"the {self.kind} engine host exited with code {proc.returncode} before it "
                                  f"served; last lines of {self.dir / LOG_NAME}:\n  " + _tail(self.dir / LOG_NAME))
            if proc is None and not host_alive(self.dir):
                proc = self._spawn(args)
            if time.monotonic() > deadline:
                raise TetherError(f"the {self.kind} engine host did not start within {HOST_START_S:.0f} s; "
                                  f"see {self.dir / LOG_NAME}")
            await asyncio.sleep(0.05)

    @staticmethod
    def _unfit(attached: Attached, args: HostArgs) -> str | None:
        if attached.version != WIRE_VERSION:
            return f"it speaks wire version {attached.version}, this daemon {WIRE_VERSION}"
        if attached.failed:
            return f"its engine failed: {attached.failed}"
        if attached.key != args.key and not attached.held and not attached.results:
            return "it was started with another configuration or release, and is idle"
        return None

    async def _connect(self, key: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Attached] | None:
        path, fd = socket_path(self.dir)
        try:
            reader, writer = await asyncio.open_unix_connection(path, limit=1 << 24)
        except OSError:
            return None
        finally:
            if fd is not None:
                os.close(fd)
        writer.write(frame(Attach(key)))
        try:
            body = await asyncio.wait_for(read_frame(reader), 30)
            attached = to_daemon.decode(body) if body is not None else None
        except (TimeoutError, msgspec.DecodeError):
            attached = None
        if not isinstance(attached, Attached):  # stopping, or not a host of ours
            writer.close()
            await asyncio.sleep(0.2)
            return None
        return reader, writer, attached

    def _spawn(self, args: HostArgs) -> subprocess.Popen[bytes]:
        with open(self.dir / LOG_NAME, "ab") as log_file:
            proc = subprocess.Popen([sys.executable, "-m", HOST_MODULE, str(self.dir)], cwd=self.dir,
                                    stdin=subprocess.PIPE, stdout=log_file, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # outlives the daemon, and its signals
        assert proc.stdin is not None
        proc.stdin.write(msgspec.msgpack.encode(args))
        proc.stdin.close()
        log.info("started the %s engine host (pid %d)", self.kind, proc.pid)
        self._proc = proc
        return proc

    async def _shutdown_host(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pid: int) -> None:
        """Have the host stop its engine and exit; kill it if it does not."""
        writer.write(frame(Shutdown()))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_until_stopped(reader), HOST_STOP_S)
        writer.close()
        await asyncio.to_thread(_wait_exit, self.dir, pid)

    # --- the connection -------------------------------------------------------------------------------
    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            body = await read_frame(reader)
            if body is None:
                break
            try:
                msg = to_daemon.decode(body)
            except msgspec.DecodeError as exc:
                log.warning("dropping a frame the engine host sent: %s", exc)
                continue
            if isinstance(msg, Done):
                for result in msg.results:
                    self._result(result)
            elif isinstance(msg, Started):
                if msg.id in self.held:
                    self.on_running(msg.id, msg.ts)
            elif isinstance(msg, Capacity):
                self._cap = msg.figures
            elif isinstance(msg, Stopped):
                self._stopped.set()
        self._stopped.set()
        if not self.stopping and self.writer is not None:
            self._host_lost()

    def _result(self, result: Result) -> None:
        self._delivered.add(result.id)
        if result.id in self.held or result.id in self._adopted:
            self.held.discard(result.id)
            self._adopted.discard(result.id)
            self.on_result(result)
        else:  # (not ours to report: a duplicate) nothing to spool, so acknowledged at once
            self.results_kept([result.id])

    def _host_lost(self) -> None:
        """The host ended under us (killed, out of memory): its tasks fail in words."""
        self.writer = None
        self.failed_state = (f"the {self.kind} engine host (pid {self.host_pid}) that runs Parsl for this endpoint "
                             f"ended; see {self.dir / LOG_NAME}. Restart the endpoint")
        log.error("%s", self.failed_state)
        from ..process import WorkerLost

        for tid in sorted(self.held):
            self.on_result(failure(tid, WorkerLost(self.failed_state)))
        self.held.clear()
        # what its Parsl started here is orphaned: the interchange is in the host's process group
        # (its process title hides its environment), worker pools and workers carry the run mark
        with contextlib.suppress(OSError):
            os.killpg(self.host_pid, signal.SIGKILL)
        if self.run_mark:
            self._ending = asyncio.ensure_future(asyncio.to_thread(_end_marked, self.run_mark))

    def _write(self, message: Any) -> None:
        if self.writer is not None:
            self.writer.write(frame(message))

    # --- the engine interface -------------------------------------------------------------------------
    def submit(self, task: TaskSpec) -> None:
        if self.writer is None:
            self.on_result(failure(task.id, RuntimeError(
                f"the {self.kind} engine failed and runs no more tasks: {self.failed_state}")))
            return
        self.held.add(task.id)
        self._tasks_out.add([task])

    def cancel(self, task_id: str) -> None:
        if task_id in self.held:
            self._tasks_out.flush()  # (it may not have left yet)
            self._write(CancelTasks([task_id]))  # the host answers with its cancelled result

    def results_kept(self, ids: list[str]) -> None:
        mine = [tid for tid in ids if tid in self._delivered]
        if not mine:
            return
        self._delivered.difference_update(mine)
        self._acks.add(mine)

    def capacity(self) -> dict[str, Any]:
        now = time.monotonic()
        if self.writer is not None and now - self._cap_asked > CAPACITY_EVERY_S:
            self._cap_asked = now
            self._write(AskCapacity())
        cap = dict(self._cap)
        cap.setdefault("engine", self.kind)
        cap["engine_host"] = self.host_pid
        if self.failed_state:
            cap["failed"] = self.failed_state
        return cap

    def engine_info(self) -> dict[str, Any]:
        spec = provider_spec(self.config)
        info: dict[str, Any] = {"type": self.kind,
                                "provider": spec.get("type") if isinstance(spec, dict) else str(spec)}
        if self.kind == "mpi":
            info["mpi_launcher"] = self.config.get("mpi_launcher", "mpiexec")
            info["parsl_mpi_env"] = True
        return info

    async def detach(self) -> None:
        """A restart: what the host runs stays there for the next daemon; only the connection ends."""
        if self.writer is None:
            return
        self.stopping = True
        self._tasks_out.flush()
        self._acks.flush()
        writer, self.writer = self.writer, None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.drain(), 10)
        writer.close()
        self._reading.cancel()

    async def stop(self) -> None:
        """A real stop: the host stops the engine (every task, every block), then exits."""
        if not hasattr(self, "host_pid"):  # never attached
            return
        self.stopping = True
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.write(frame(Shutdown()))
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._stopped.wait(), HOST_STOP_S)
            writer.close()
        await asyncio.to_thread(_wait_exit, self.dir, self.host_pid)
        if getattr(self, "_ending", None) is not None:
            await self._ending
        proc = getattr(self, "_proc", None)
        if proc is not None:
            with contextlib.suppress(Exception):
                proc.wait(timeout=1)


async def _until_stopped(reader: asyncio.StreamReader) -> None:
    while (body := await read_frame(reader)) is not None:
        with contextlib.suppress(msgspec.DecodeError):
            if isinstance(to_daemon.decode(body), Stopped):
                return


def host_alive(directory: Path) -> bool:
    """Whether an engine host runs for this endpoint (it holds the lock for its lifetime)."""
    try:
        with open(directory / LOCK_NAME, "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
            return False
    except OSError:
        return False


def host_pid(directory: Path) -> int | None:
    """The live engine host's pid (checked to be the host of this endpoint), or None."""
    if not host_alive(directory):
        return None
    path = directory / PID_NAME
    try:
        pid = int(path.read_text().split()[0])
        written = path.stat().st_mtime
    except (OSError, ValueError, IndexError):
        return None
    return pid if is_recorded_process(pid, ((HOST_MODULE, str(directory)),), written) else None


def _wait_exit(directory: Path, pid: int, timeout: float = 10.0) -> None:
    """Wait for the host to exit; kill it and its process group (the interchange) if it does not."""
    deadline = time.monotonic() + timeout
    while host_alive(directory) and time.monotonic() < deadline:
        time.sleep(0.05)
    if host_alive(directory):
        log.warning("the engine host (pid %d) did not exit; killing it", pid)
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)


def end_orphaned_host(directory: Path, timeout: float = HOST_STOP_S) -> bool:
    """``tether endpoint stop`` with no daemon running: stop the engine host a killed daemon left
    (SIGTERM: it stops the engine as a stop does). False if there is none."""
    pid = host_pid(directory)
    if pid is None:
        return False
    if not signal_and_wait(pid, signal.SIGTERM, timeout):
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
    return True


def _end_marked(run_mark: str) -> None:
    """Kill the processes a dead host's Parsl left on this host (they carry its run mark)."""
    from .engine import RUN_MARK, marked_processes

    for proc in marked_processes(RUN_MARK, run_mark):
        log.warning("killing pid %s, left behind by the engine host", proc.pid)
        with contextlib.suppress(Exception):
            proc.kill()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n  ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


__all__ = ["HostedParslEngine", "end_orphaned_host", "host_alive", "host_pid"]
