"""The engine host: the process that runs an endpoint's Parsl executor, so that it outlives the
daemon (issue 24: a restart, an upgrade followed by one, or a daemon killed by SIGKILL kills no
running task and loses no result).

Parsl's HighThroughputExecutor cannot be re-attached from another process: its interchange,
result thread and futures belong to the process that started it. So the daemon does not start
it; it starts this host (``python -m tether.endpoint.engines.parsl.host DIR``, a session of its
own) and talks to it over ``DIR/engine.sock`` (``hostwire.py``). The host runs the same
:class:`~.engine.ParslEngine` the daemon ran before, unchanged: block scaling, the RUNNING
datagrams, cancel, worker loss and retries all happen here.

When the daemon goes away (``restart``, SIGKILL, a crash) the host notices the end of its
connection and carries on: the interchange and the blocks run, tasks queued in Parsl start as
workers free up, results are kept. The next daemon attaches and is told which tasks the host
holds (it reports them to the service as its own, so none is sent again or waited for) and
gets every result no daemon has acknowledged; a daemon acknowledges a result once it has
spooled it, so a daemon killed between the two loses nothing either. ``Shutdown`` (a real
``tether endpoint stop``) or SIGTERM stops the engine as the daemon used to, then the host
exits. One host per endpoint: it holds ``engine-host.lock`` for its lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from tether import event_loop
from tether.endpoint.execute import Allowlist
from tether.protocol import Result

from . import hostwire as wire

log = logging.getLogger("tether.endpoint.parsl.host")


def allowed_methods(args: wire.HostArgs) -> Allowlist | frozenset[str] | None:
    if args.allowed_plain is not None:
        return frozenset(args.allowed_plain)
    if args.allowed_data is None and args.allowed_functions is None:
        return None
    return Allowlist(data=None if args.allowed_data is None else frozenset(args.allowed_data),
                     functions=None if args.allowed_functions is None else frozenset(args.allowed_functions))


class EngineHost:
    """Serves one daemon at a time; keeps what it cannot deliver until the next one attaches."""

    def __init__(self, args: wire.HostArgs, directory: Path):
        self.args = args
        self.dir = directory
        self.writer: asyncio.StreamWriter | None = None
        self.unacked: dict[str, Result] = {}  # results produced and not yet spooled by a daemon
        self.running_since: dict[str, float] = {}
        #: the results of one loop turn travel in one frame
        self._results_out: wire.Gather[Result] = wire.Gather(lambda results: self._send(wire.Done(results)))
        self.finished = asyncio.Event()
        self.stopping = False

    async def serve(self) -> None:
        from .engine import HtexEngine, MPIEngine

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.shutdown()))
        kind = HtexEngine if self.args.config.get("type", "htex") == "htex" else MPIEngine
        self.engine = kind(self.args.config, self._on_running, self._on_result,
                           allowed_methods=allowed_methods(self.args),
                           retries_on_worker_loss=self.args.retries_on_worker_loss,
                           python_sandbox=self.args.python_sandbox, state_dir=Path(self.args.state_dir))
        await self.engine.start()
        path, fd = wire.socket_path(self.dir)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dir / wire.SOCKET_NAME)
        old = os.umask(0o077)
        try:
            server = await asyncio.start_unix_server(self._serve_daemon, path=path)
        finally:
            os.umask(old)
            if fd is not None:
                os.close(fd)
        log.info("engine host %s ready: %s engine, socket %s", os.getpid(), self.engine.kind,
                 self.dir / wire.SOCKET_NAME)
        await self.finished.wait()
        server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dir / wire.SOCKET_NAME)

    # --- the engine's callbacks -------------------------------------------------------------------
    def _on_running(self, task_id: str, ts: float) -> None:
        self.running_since[task_id] = ts
        self._send(wire.Started(task_id, ts))

    def _on_result(self, result: Result) -> None:
        self.unacked[result.id] = result
        self.running_since.pop(result.id, None)
        if self.writer is None:
            return
        self._results_out.add([result])

    def _send(self, message: Any) -> None:
        if self.writer is not None:
            self.writer.write(wire.frame(message))

    # --- the daemon's connection --------------------------------------------------------------------
    async def _serve_daemon(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await wire.read_frame(reader)
        try:
            hello = wire.to_host.decode(first) if first is not None else None
        except msgspec.DecodeError:
            hello = None
        if not isinstance(hello, wire.Attach) or self.stopping:
            writer.close()
            return
        if self.writer is not None:  # (a daemon that went away without its socket closing yet)
            self.writer.close()
        self.writer = writer
        self._results_out.clear()  # all of them go in the answer below
        engine = self.engine
        writer.write(wire.frame(wire.Attached(
            pid=os.getpid(), key=self.args.key, version=wire.WIRE_VERSION, held=list(engine.tasks),
            running={t: self.running_since[t] for t in engine.tasks if t in self.running_since},
            results=list(self.unacked.values()), capacity=engine.capacity(), failed=engine.failed_state,
            run_mark=engine._run_mark)))
        log.info("a daemon attached: %d task(s) held, %d result(s) to deliver", len(engine.tasks), len(self.unacked))
        while True:
            body = await wire.read_frame(reader)
            if body is None:
                break
            try:
                msg = wire.to_host.decode(body)
            except msgspec.DecodeError as exc:
                log.warning("dropping a frame the daemon sent: %s", exc)
                continue
            if isinstance(msg, wire.Submit):
                for task in msg.tasks:
                    if task.id not in engine.tasks and task.id not in self.unacked:  # never twice at once
                        engine.submit(task)
            elif isinstance(msg, wire.CancelTasks):
                for tid in msg.ids:
                    engine.cancel(tid)
            elif isinstance(msg, wire.Ack):
                for tid in msg.ids:
                    self.unacked.pop(tid, None)
            elif isinstance(msg, wire.AskCapacity):
                self._send(wire.Capacity(engine.capacity()))
            elif isinstance(msg, wire.Shutdown):
                await self.shutdown()
                return
        if self.writer is writer:
            self.writer = None
            if not self.stopping:
                log.info("the daemon went away: %d task(s) keep running, results are kept for the next daemon",
                         len(engine.tasks))
        writer.close()

    async def shutdown(self) -> None:
        """A real stop: end every task and block, tell the daemon, exit."""
        if self.stopping:
            return
        self.stopping = True
        log.info("stopping the engine")
        try:
            await self.engine.stop()
        finally:
            writer, self.writer = self.writer, None
            if writer is not None:
                writer.write(wire.frame(wire.Stopped()))
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.drain(), 5)
                writer.close()
            self.finished.set()


def main(argv: list[str]) -> int:
    directory = Path(argv[1])
    args = msgspec.msgpack.decode(sys.stdin.buffer.read(), type=wire.HostArgs)
    level = logging.DEBUG if os.environ.get("TETHER_LOG_LEVEL", "").upper() == "DEBUG" else logging.INFO
    logging.basicConfig(stream=sys.stderr, level=level,
                        format="%(asctime)s %(levelname)s %(name)s [host %(process)d]: %(message)s")
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    lock = open(directory / wire.LOCK_NAME, "a")  # noqa: SIM115 - held (locked) for the host's lifetime
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        log.error("another engine host runs for %s; exiting", directory)
        return 3
    (directory / wire.PID_NAME).write_text(f"{os.getpid()} {time.time()}")
    try:
        event_loop.run(EngineHost(args, directory).serve())  # uvloop where installed, as the daemon
    except Exception:
        log.exception("the engine host failed")
        return 1
    finally:
        with contextlib.suppress(FileNotFoundError):
            (directory / wire.PID_NAME).unlink()
    log.info("engine host %s exits", os.getpid())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
