"""The htex and mpi engines' lifecycle: start Parsl's executor (in the engine host, see host.py), scale its
blocks, hand it tasks, turn its outcomes into results, and stop everything it started.

Parsl runs without its DataFlowKernel here, so the engine does what the DFK would: it drives
block scaling with Parsl's own ``Strategy`` from a loop that a submit can wake (a task with no
block up scales out at once), watches the interchange (Parsl does not; without it every task
would wait forever), and at stop cancels the batch jobs and kills what a lost worker pool left
on this host (every process Parsl starts here carries a mark in its environment). Worker loss
fails a task in words, or retries it up to ``retries_on_worker_loss`` times.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether.results import cancelled, failure

from ..base import Engine, TaskSpec
from . import _compat
from .cancel import ControlFiles, RunningChannel
from .config import LOCAL_PROVIDERS, build_executor, resource_specification, validate_engine
from .worker import WorkerRun, run_in_worker

log = logging.getLogger("tether.endpoint.parsl")

#: the environment variable that marks the processes of one engine run (see ParslEngine.start)
RUN_MARK = "TETHER_PARSL_RUN"
#: Give up after this many blocks in a row failed without their worker pool ever connecting.
BLOCK_FAILURES_TO_GIVE_UP = 3


@dataclass
class _Task:
    spec: TaskSpec
    future: Any = None
    running: bool = False
    host: str | None = None
    pid: int | None = None
    tries: int = 0


class ParslEngine(Engine):
    """``htex`` / ``mpi``: Parsl's HighThroughputExecutor (or MPIExecutor) with any Parsl provider."""

    kind = "htex"

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.kind = self.config.get("type", "htex")
        source = self.config.get("_source", "engine config")
        validate_engine(self.config, source)
        if os.environ.get("TETHER_LOG_LEVEL", "").upper() != "DEBUG":
            logging.getLogger("parsl").setLevel(logging.WARNING)
        self.run_dir = self._run_dir()
        self.control = ControlFiles(self.run_dir / "control", socket.gethostname())
        self.tasks: dict[str, _Task] = {}
        self.cancelled: dict[str, Any] = {}  # task id -> its Parsl future (until Parsl lets go of it)
        self._cap: dict[str, Any] = {}
        self._cap_at = 0.0
        self._cap_busy = False
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._scale_lock = threading.Lock()
        self.failed_state: str | None = None
        # every process Parsl starts on this host (interchange, local blocks, their workers and
        # helpers) inherits this mark: what a lost pool leaves behind is found, and ended, at stop
        self._run_mark = os.environ[RUN_MARK] = secrets.token_hex(8)
        await asyncio.to_thread(self._start_parsl, source)
        # the RUNNING channel (see cancel.py): on the address the workers use to reach the interchange
        bind = "127.0.0.1" if self._local_only() else (self.config.get("address") or "0.0.0.0")
        key = secrets.token_bytes(32)
        self._transport, _ = await self.loop.create_datagram_endpoint(
            lambda: RunningChannel(key, self._started), local_addr=(bind, 0)
        )
        port = self._transport.get_extra_info("sockname")[1]
        addresses = ["127.0.0.1"] if self._local_only() else _compat.worker_addresses(self.executor)
        self.worker_run = WorkerRun(self.engine_info(), str(self.control.dir), (addresses, port, key),
                                    self.allowed_methods, self.python_sandbox)
        await asyncio.to_thread(self._refresh_capacity)
        log.info("%s engine started: %s, run dir %s", self.kind, self.provider_name, self.run_dir)

    def _run_dir(self) -> Path:
        if self.config.get("_endpoint_dir"):
            return Path(self.config["_endpoint_dir"]) / "parsl"
        from tether.home import tether_home

        return tether_home() / "parsl" / uuid.uuid4().hex[:8]

    def _local_only(self) -> bool:
        addr = self.config.get("address")
        if addr:
            return addr.startswith("127.") or addr == "localhost"
        return self.provider_name in LOCAL_PROVIDERS

    def _start_parsl(self, source: str) -> None:
        executor = build_executor(self.kind, self.config, self.run_dir, source, tolerant_block_errors)
        self.provider_name = type(executor.provider).__name__
        self.executor = executor
        executor.start()
        _compat.guard_scale_in(executor)
        self.strategy = _compat.new_strategy(self.config.get("strategy", "simple"),
                                             float(self.config.get("max_idletime", 120)), executor)
        self.strategy_period = float(self.config.get("strategy_period", 1.0))
        self._scaler = threading.Thread(target=self._scaling_loop, name="tether-parsl-scaling", daemon=True)
        self._scaler.start()

    def _scaling_loop(self) -> None:
        """Parsl's JobStatusPoller, but one we can wake: a submit with no block up decides at once."""
        first = True
        while not self._stop.is_set():
            if not first:
                self._kick.wait(self.strategy_period)
                self._kick.clear()
            first = False
            if self._stop.is_set():
                return
            with self._scale_lock:
                if self._interchange_died():
                    return
                try:
                    _compat.scaling_step(self.executor, self.strategy)
                except Exception:  # noqa: BLE001 - keep scaling; Parsl logs the details
                    log.exception("scaling step failed")
                if self.executor.bad_state_is_set and self.failed_state is None:
                    self.failed_state = str(self.executor.executor_exception)
                    log.error("the %s engine failed: %s", self.kind, self.failed_state)

    def _interchange_died(self) -> bool:
        """Parsl does not watch its interchange; without it every task would wait forever. Fail them all."""
        exited = _compat.interchange_exit(self.executor)
        if exited is None:
            return False
        pid, code = exited
        self.failed_state = (
            f"Parsl's interchange process (pid {pid}) exited with code {code}; see "
            f"{self.run_dir / self.executor.label / 'interchange.log'}. Restart the endpoint"
        )
        log.error("the %s engine failed: %s", self.kind, self.failed_state)
        if not self.executor.bad_state_is_set:
            self.executor.set_bad_state_and_fail_all(RuntimeError(self.failed_state))
        return True

    async def stop(self) -> None:
        if not hasattr(self, "executor"):
            return
        self._stop.set()
        self._kick.set()
        try:
            self._transport.close()
        except Exception:  # noqa: BLE001
            pass
        for tid, entry in list(self.tasks.items()):
            self.control.kill_attempts(tid, entry.tries + 1)
        try:
            await asyncio.wait_for(asyncio.to_thread(self._shutdown_parsl), timeout=60)
        except TimeoutError:
            log.warning("Parsl did not shut down within 60 s")
        await asyncio.to_thread(self._end_leftovers)

    def _end_leftovers(self, grace: float = 5.0) -> None:
        """Kill what Parsl started on this host and did not stop: the workers and helpers of a
        pool that was lost (orphans: Parsl no longer knows them), or that ignored the shutdown."""
        import psutil

        deadline = time.monotonic() + grace
        while True:
            left = marked_processes(RUN_MARK, self._run_mark)
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        for proc in left:
            log.warning("killing pid %s, left behind by Parsl: %s", proc.pid, " ".join(proc.cmdline())[:200])
            try:
                proc.kill()
            except psutil.Error:
                pass

    def _shutdown_parsl(self) -> None:
        self._scaler.join(timeout=10)
        with self._scale_lock:
            ex = self.executor
            try:
                if not ex.bad_state_is_set:
                    ex.scale_in_facade(len(_compat.block_statuses(ex)))  # cancels the batch jobs (pilot jobs)
                else:  # Parsl's scale-in asks the (maybe dead) interchange first: cancel the jobs directly
                    _compat.cancel_live_jobs(ex)
            except Exception:  # noqa: BLE001
                log.exception("scaling in at stop failed")
            try:
                _compat.drop_unsent_messages(ex)
                ex.shutdown()
            except Exception:  # noqa: BLE001
                log.exception("executor shutdown failed")

    def engine_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"type": self.kind, "provider": getattr(self, "provider_name", None)}
        if self.kind == "mpi":
            # Parsl's worker sets PARSL_MPI_PREFIX, PARSL_NUM_RANKS, ... for every task: use those
            info["mpi_launcher"] = self.config.get("mpi_launcher", "mpiexec")
            info["parsl_mpi_env"] = True
        return info

    # --- tasks ------------------------------------------------------------------------------------
    def submit(self, task: TaskSpec) -> None:
        self.tasks[task.id] = entry = _Task(task)
        self._hand_over(entry)

    def _hand_over(self, entry: _Task) -> None:
        task = entry.spec
        try:
            if self.failed_state is not None:
                raise RuntimeError(
                    f"the {self.kind} engine failed and runs no more tasks: {self.failed_state}. "
                    f"Fix the cause and restart the endpoint"
                )
            self.control.check(task.id)  # an id that could leave control/ fails the task here
            nodes_per_block = int(getattr(self.executor.provider, "nodes_per_block", 1) or 1)
            rspec = resource_specification(self.kind, task.spec, nodes_per_block)
            fut = self.executor.submit(run_in_worker, rspec, task, self.worker_run, entry.tries)
        except Exception as exc:  # noqa: BLE001 - a bad spec, a serialization error, a dead executor
            self.tasks.pop(task.id, None)
            self.on_result(failure(task.id, exc))
            return
        entry.future = fut
        fut.add_done_callback(lambda f, tid=task.id: self.loop.call_soon_threadsafe(self._done, tid, f))
        if not _compat.blocks_up(self.executor):
            self._kick.set()  # no block to run it: let the strategy scale out now, not in a period

    def _done(self, task_id: str, fut: Any) -> None:
        if task_id in self.cancelled:
            if self.cancelled[task_id] is fut:
                del self.cancelled[task_id]
                self.control.forget(task_id)
            return
        entry = self.tasks.get(task_id)
        if entry is None or entry.future is not fut:
            return
        exc = fut.exception()
        if exc is None:
            result = fut.result()
            self.tasks.pop(task_id, None)
            if result is not None:
                self.on_result(result)
            return
        lost = _loss_message(exc)
        if lost:
            # the worker of a lost pool lives on, orphaned, until its task ends (or for ever, if
            # it waits on the dead pool): a lost attempt's worker on this host is killed now
            self.control.kill_attempts(task_id, entry.tries + 1)
        if lost and entry.tries < self.retries_on_worker_loss:
            entry.tries += 1
            entry.running = False
            log.warning(
                "task %s: %s; retrying it (%d of %d)", task_id, lost, entry.tries, self.retries_on_worker_loss
            )
            self._hand_over(entry)
            return
        self.tasks.pop(task_id, None)
        if lost:
            from ..process import WorkerLost

            err: BaseException = WorkerLost(
                lost + (f" (tried {entry.tries + 1} times)" if entry.tries else "")
            )
        else:
            err = RuntimeError(f"the {self.kind} engine could not run this task: {_describe(exc)}")
        self.on_result(failure(task_id, err))

    def _started(self, task_id: str, pid: int, host: str, ts: float) -> None:
        """A worker's RUNNING datagram: report the task running, the first time only."""
        entry = self.tasks.get(task_id)
        if entry is None or entry.running:
            return
        entry.running, entry.host, entry.pid = True, host, pid
        self.on_running(task_id, ts)

    def cancel(self, task_id: str) -> None:
        entry = self.tasks.pop(task_id, None)
        if entry is None:
            return
        if entry.future is not None and not entry.future.done():
            self.cancelled[task_id] = entry.future
            self.control.withdraw(task_id, entry.tries + 1)
        self.on_result(cancelled(task_id, time.time()))

    # --- capacity ---------------------------------------------------------------------------------
    def capacity(self) -> dict[str, Any]:
        if not self._cap_busy and time.monotonic() - self._cap_at > 0.5:
            self._cap_busy = True
            self.loop.run_in_executor(None, self._refresh_capacity)
        running = sum(1 for t in self.tasks.values() if t.running)
        cap = dict(self._cap)
        total = cap.get("workers_total", 0)
        cap.update(
            {
                "engine": self.kind,
                "provider": getattr(self, "provider_name", None),
                "workers_idle": max(0, total - running),
                "tasks_queued": max(0, len(self.tasks) - running),
                "tasks_running": running,
            }
        )
        if self.failed_state:
            cap["failed"] = self.failed_state
        return cap

    def _refresh_capacity(self) -> None:
        """Ask the interchange (a ZMQ round trip) off the loop; capacity() reports the last answer."""
        from parsl.jobs.states import JobState

        try:
            managers = [m for m in self.executor.connected_managers() if m.get("active")]
            states = [s.state for s in _compat.block_statuses(self.executor).values()]
            self._cap = {
                "blocks": sum(1 for s in states if s in (JobState.PENDING, JobState.RUNNING, JobState.HELD)),
                "blocks_pending": sum(1 for s in states if s == JobState.PENDING),
                "blocks_running": sum(1 for s in states if s == JobState.RUNNING),
                "managers": len(managers),
                "workers_total": sum(int(m.get("worker_count") or 0) for m in managers),
                "max_blocks": getattr(self.executor.provider, "max_blocks", None),
            }
        except Exception as exc:  # noqa: BLE001 - interchange busy or gone: keep the last figures
            log.debug("capacity refresh failed: %s", exc)
        finally:
            self._cap_at = time.monotonic()
            self._cap_busy = False


class HtexEngine(ParslEngine):
    kind = "htex"


class MPIEngine(ParslEngine):
    kind = "mpi"


def tolerant_block_errors(executor: Any, status: dict[str, Any]) -> None:
    """Parsl's default block error handler fails the executor for good once every block it launched
    has failed; one lost node or one pilot job killed then ends a daemon that should outlive them.
    Here a block that ran and died is simply replaced by the scaling strategy (its tasks fail as lost,
    or are retried), and the engine gives up only when the last few blocks all failed before any
    worker pool connected: a wrong partition, account or ``worker_init``, which retrying cannot fix."""
    from parsl.jobs.states import JobState

    def key(block_id: str) -> tuple[int, str]:
        return (int(block_id), "") if block_id.isdigit() else (1 << 60, block_id)

    ids = sorted(status, key=key)[-BLOCK_FAILURES_TO_GIVE_UP:]
    if len(ids) < BLOCK_FAILURES_TO_GIVE_UP or any(
        not status[b].terminal or status[b].state == JobState.SCALED_IN for b in ids
    ):
        return
    try:
        connected = set(executor.connected_blocks())
    except Exception:  # noqa: BLE001 - cannot tell: do not give up
        return
    if connected.intersection(ids):
        return
    recent = [status[b] for b in ids]
    executor.set_bad_state_and_fail_all(
        RuntimeError(
            f"the last {len(recent)} blocks failed before their worker pools connected (check the provider "
            f"settings and worker_init; the jobs' output is in parsl/submit_scripts/): {_compat.blocks_error(recent)}"
        )
    )


def _loss_message(exc: BaseException) -> str | None:
    """Parsl's WorkerLost / ManagerLost in words (None: another failure)."""
    from parsl.executors.high_throughput.errors import ManagerLost, WorkerLost

    if isinstance(exc, WorkerLost):
        return (
            f"the Parsl worker running this task (worker {exc.worker_id} on host {exc.hostname}) died: "
            f"out of memory, a crash in native code, os._exit in the task, or it was killed"
        )
    if isinstance(exc, ManagerLost):
        return (
            f"the Parsl worker pool running this task (manager {exc.manager_id.decode(errors='replace')} "
            f"on host {exc.hostname}) stopped answering: its node failed, or its batch job was killed "
            f"or ran out of walltime"
        )
    return None


def _describe(exc: BaseException) -> str:
    from parsl.executors.errors import BadStateException

    if isinstance(exc, BadStateException):
        return f"the engine failed: {getattr(exc, 'reason', exc)}"
    return f"{type(exc).__name__}: {exc}"


def marked_processes(name: str, value: str) -> list[Any]:
    """This user's live processes (not this one) whose environment has ``name=value``."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == os.getpid() or proc.uids().real != os.getuid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(name) == value:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found
