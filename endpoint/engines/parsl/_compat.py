"""The one seam between the Parsl engines and Parsl's private API.

The engines drive Parsl's HighThroughputExecutor without Parsl's DataFlowKernel: they scale
blocks with Parsl's own ``Strategy`` the way its ``JobStatusPoller`` does, watch the
interchange, and stop it at once. For that they touch names Parsl does not document: a
private helper, undocumented attributes and a patched method. Each use is one function here
that says what it relies on and what happens when it is gone.

They were read against the Parsl source and tested with the versions in
:data:`CHECKED_VERSIONS`. :func:`check_supported` verifies, at import, the shape of what the
engine cannot run without (scaling and the worker-pool command) and fails in words when it
changed; the rest degrades, as each function says.
"""

from __future__ import annotations

import inspect
import logging
import shlex
import sys
from collections.abc import Callable
from typing import Any

import parsl
from parsl.executors import HighThroughputExecutor
from parsl.executors.high_throughput import executor as _htex_module
from parsl.executors.status_handling import BlockProviderExecutor
from parsl.jobs.states import TERMINAL_STATES
from parsl.jobs.strategy import Strategy

from tether.errors import TetherError

log = logging.getLogger("tether.endpoint.parsl")

#: Parsl releases whose internals this module was read and tested against; other releases are
#: accepted when :func:`check_supported` finds the same shape
CHECKED_VERSIONS = ("2026.10.26",)

#: what JobStatusPoller calls on a BlockProviderExecutor, which the engine calls in its place
_POLLER_API = ("poll_facade", "handle_errors", "status_facade", "scale_in_facade", "set_bad_state_and_fail_all",
               "bad_state_is_set", "executor_exception")
_WORKER_POOL_SCRIPT = "process_worker_pool.py"


class UnsupportedParsl(TetherError):
    """The installed Parsl changed internals the htex and mpi engines cannot run without."""


def check_supported() -> None:
    """Fail in words if Parsl no longer has what block scaling and the worker command rely on."""
    problems = [f"BlockProviderExecutor.{name} is gone" for name in _POLLER_API
                if not hasattr(BlockProviderExecutor, name)]
    if list(inspect.signature(Strategy.__init__).parameters) != ["self", "strategy", "max_idletime"]:
        problems.append("parsl.jobs.strategy.Strategy(strategy=, max_idletime=) changed")
    if "max_idletime" not in inspect.signature(HighThroughputExecutor.scale_in).parameters:
        problems.append("HighThroughputExecutor.scale_in has no max_idletime")
    if not str(getattr(_htex_module, "DEFAULT_LAUNCH_CMD", "")).startswith(_WORKER_POOL_SCRIPT):
        problems.append(f"parsl.executors.high_throughput.executor.DEFAULT_LAUNCH_CMD no longer starts with "
                        f"{_WORKER_POOL_SCRIPT}")
    if problems:
        raise UnsupportedParsl(
            f"the htex and mpi engines do not support Parsl {parsl.__version__}: " + "; ".join(problems)
            + f". They were checked against Parsl {', '.join(CHECKED_VERSIONS)}; install one of those or a "
            "tether release that supports this one."
        )


check_supported()


def launch_commands(in_image: Callable[[str], str] | None = None) -> tuple[str, list[str]]:
    """Worker-pool and interchange commands that run under *this* interpreter, not via PATH.

    Relies on ``DEFAULT_LAUNCH_CMD`` (a module constant) starting with the bare script name
    ``process_worker_pool.py``: the module is run with ``python -m`` in its place and the rest of
    Parsl's template is kept (checked at import). ``in_image``: for workers in a container, turns
    the worker pool's arguments (``-m MODULE ...``, a template Parsl formats) into the launch
    command's template, under the image's Python.
    """
    default: str = _htex_module.DEFAULT_LAUNCH_CMD
    module = "parsl.executors.high_throughput.process_worker_pool"
    rest = f" -m {module}{default[len(_WORKER_POOL_SCRIPT):]}"
    launch = shlex.quote(sys.executable) + rest if in_image is None else in_image(rest)
    return launch, [sys.executable, "-m", "parsl.executors.high_throughput.interchange"]


def set_interchange_command(executor: Any, command: list[str]) -> None:
    """MPIExecutor's constructor types ``interchange_launch_cmd`` as a str, which its interchange
    start cannot use: set the attribute, which ``start()`` reads, after construction. Gone: the
    attribute is set to no effect, and the interchange is found on ``PATH`` as Parsl's default."""
    executor.interchange_launch_cmd = command


def listen_on_all_interfaces(executor: Any, addresses: set[str]) -> None:
    """Have the interchange listen on every interface and tell workers ``addresses`` to try.
    Relies on the undocumented ``all_addresses``, which HTEX fills at construction by probing
    (including asking a web service for this host's public address) and reads at ``start()``.
    Gone: workers get only what Parsl's own probe finds."""
    executor.address = None
    executor.all_addresses = addresses


def worker_addresses(executor: Any) -> list[str]:
    """The addresses workers are told to reach the interchange at (the undocumented
    ``all_addresses``, see :func:`listen_on_all_interfaces`), where RUNNING datagrams go too."""
    return sorted(executor.all_addresses)


def block_statuses(executor: Any) -> dict[str, Any]:
    """Block id -> JobStatus as last polled (``status_facade``, what the strategy sees)."""
    statuses: dict[str, Any] = executor.status_facade
    return statuses


def blocks_up(executor: Any) -> bool:
    """Whether any block is pending or running."""
    return any(s.state not in TERMINAL_STATES for s in block_statuses(executor).values())


def new_strategy(strategy: str, max_idletime: float, executor: Any) -> Strategy:
    """Parsl's scaling ``Strategy`` for one executor, as the DataFlowKernel's poller makes it."""
    scaler = Strategy(strategy=strategy, max_idletime=max_idletime)
    scaler.add_executors([executor])
    return scaler


def scaling_step(executor: Any, strategy: Strategy) -> None:
    """One round of Parsl's ``JobStatusPoller``: poll the blocks, let the block error handler
    see them, then scale. Relies on ``poll_facade``/``handle_errors``/``strategize``, the poller's
    calls (checked at import)."""
    executor.poll_facade()
    executor.handle_errors(block_statuses(executor))
    strategy.strategize([executor])


def guard_scale_in(executor: Any) -> None:
    """HTEX's ``scale_in(0, max_idletime=...)`` kills one idle block anyway (its loop checks
    ``len == blocks`` only after it appended one), and htex_auto_scale asks for exactly that whenever
    a block has more slots than tasks, e.g. a 2-worker block still starting with 1 task queued.
    The executor's ``scale_in`` is replaced by one that, asked for none, kills none. Harmless
    when Parsl fixes it; gone (a read-only attribute), blocks are scaled in as Parsl does."""
    original = executor.scale_in

    def scale_in(blocks: int, *args: Any, **kwargs: Any) -> list[str]:
        return [] if blocks <= 0 else original(blocks, *args, **kwargs)

    executor.scale_in = scale_in


def blocks_error(statuses: list[Any]) -> Exception:
    """The failure of ``statuses`` (JobStatus) in Parsl's words: its private
    ``parsl.jobs.error_handlers._get_error``, which adds each job's stdout and stderr summary.
    Gone: their messages or exit codes, joined."""
    try:
        from parsl.jobs.error_handlers import _get_error

        return _get_error(dict(enumerate(statuses)))  # type: ignore[no-any-return]
    except Exception:  # noqa: BLE001 - a private helper of Parsl's; the gist is enough
        return RuntimeError("; ".join(s.message or f"exit code {s.exit_code}" for s in statuses))


def interchange_exit(executor: Any) -> tuple[int, int] | None:
    """(pid, exit code) of the executor's interchange once it has exited, else None. Parsl does
    not watch its interchange; this reads the undocumented ``interchange_proc`` (a Popen). Gone:
    None, and a dead interchange goes unnoticed (tasks wait until the endpoint restarts)."""
    proc = getattr(executor, "interchange_proc", None)
    code = proc.poll() if proc is not None else None
    return None if code is None else (proc.pid, code)


def cancel_live_jobs(executor: Any) -> None:
    """Cancel the batch jobs of every live block straight through the provider: for a failed
    executor, whose own scale-in asks the (maybe dead) interchange first. Relies on the
    undocumented ``blocks_to_job_id``; gone: the jobs run out their walltime (logged)."""
    jobs = getattr(executor, "blocks_to_job_id", None)
    if jobs is None:
        log.warning("Parsl has no blocks_to_job_id: the batch jobs of a failed engine are left to their walltime")
        return
    live = [jobs[b] for b, st in block_statuses(executor).items() if st.state not in TERMINAL_STATES and b in jobs]
    if live:
        executor.provider.cancel(live)


def drop_unsent_messages(executor: Any) -> None:
    """Stop means now: set ZMQ_LINGER 0 on the task and result pipes, so ``shutdown()`` does not
    wait to deliver task messages nobody will run. Relies on the pipes' undocumented
    ``outgoing_q``/``incoming_q`` and their ``zmq_socket``; gone: shutdown may wait for them."""
    import zmq

    for pipe in ("outgoing_q", "incoming_q"):
        sock = getattr(getattr(executor, pipe, None), "zmq_socket", None)
        if sock is not None:
            sock.setsockopt(zmq.LINGER, 0)
