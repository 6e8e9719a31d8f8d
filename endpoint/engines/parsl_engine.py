"""The Parsl engines: ``htex`` (Parsl's HighThroughputExecutor) and ``mpi`` (Parsl's MPIExecutor).

Execution at scale is Parsl's: the engine builds the executor and the provider named in the
endpoint's YAML (any class in ``parsl.providers`` and ``parsl.launchers``, with its own keyword
arguments), starts it inside the endpoint daemon, drives block scaling with Parsl's own
``Strategy`` and hands every task to ``executor.submit`` as a call of :func:`run_in_worker`, a
module-level wrapper around :func:`tether.endpoint.execute.run_task`. So a task behaves on a
Parsl worker exactly as on the one-host engines (sandbox, ``TETHER_TASK_ID``, task context,
result record).

Nothing depends on the venv's ``bin`` being on ``PATH``: the worker pool and the interchange
are started as ``sys.executable -m parsl.executors.high_throughput.<module>``. Parsl's run
directory (submit scripts, block logs, interchange log) is ``$TETHER_HOME/endpoints/NAME/parsl/``.

**RUNNING.** HTEX never says when a task starts (its futures stay PENDING until done). The
wrapper therefore reports it: when it starts on a worker it sends one UDP datagram (task id,
pid, host, time; authenticated with an HMAC under a key that travels inside the task, over
HTEX's own CurveZMQ-encrypted channel) to a socket the engine opened on the address the
workers use to reach the interchange. The engine reports RUNNING on the first such datagram.
Datagrams may be dropped by a firewall between compute nodes and the endpoint host; then a
task goes straight from dispatched to its result, which is correct, only less detailed.

**Cancel.** HTEX has no way to withdraw a task once handed over, so:

- a task that has not started never runs: the engine writes a marker file
  ``parsl/control/TASK.cancel`` that the wrapper checks before it calls the function, and
  if the task starts anyway (a node that does not share the endpoint's filesystem) its RUNNING
  datagram makes the engine kill it at once (same host only, see next point);
- a running task is killed when its worker runs on the endpoint's host (LocalProvider, or a
  batch job that landed on the same node): the worker process and all its descendants
  (including process groups they started, such as a ShellFunction's ``bash``) get SIGKILL;
  Parsl then restarts the worker. A running task on *another* host cannot be killed (HTEX has
  no remote kill); it runs to completion and its result is dropped.
- either way the client gets a cancelled result at once.

**Worker loss.** A worker or a whole manager that dies mid-task (Parsl's ``WorkerLost`` /
``ManagerLost``) fails that task with a message in words, or re-submits it up to the
endpoint's ``retries_on_worker_loss`` times. Parsl notices a dead worker within the executor's
``heartbeat_period`` (30 s by default) and a lost manager after ``heartbeat_threshold``.
"""

from __future__ import annotations

import asyncio
import difflib
import hashlib
import hmac
import inspect
import logging
import os
import secrets
import shlex
import signal
import socket
import sys
import threading
import time
import typing
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tether.errors import ConfigError
from tether.ids import child_path

from .base import Engine, TaskSpec, cancelled_record

if TYPE_CHECKING:
    from tether.endpoint.execute import Allowlist

log = logging.getLogger("tether.endpoint.parsl")

#: Engine keys that are not executor keyword arguments (Parsl's Config has them for the DFK).
ENGINE_KEYS = {
    "type": "htex or mpi",
    "provider": "the Parsl provider: {type: SlurmProvider, ...its keyword arguments}",
    "strategy": "Parsl scaling strategy: simple (default, as Parsl's), htex_auto_scale, none",
    "max_idletime": "seconds a block may sit idle before htex_auto_scale scales it in (default 120)",
    "strategy_period": "seconds between scaling decisions (default 1)",
}
#: Executor arguments the engine sets itself (not configurable).
RESERVED = {"label", "storage_access", "remote_monitoring_radio", "manager_selector"}
STRATEGIES = ("simple", "htex_auto_scale", "none")
LOCAL_PROVIDERS = ("LocalProvider",)


# ------------------------------------------------------------------------------------------------
# the worker side: must stay cheap to import (no parsl import at module level)
# ------------------------------------------------------------------------------------------------


def _notify(notify: tuple[list[str], int, bytes] | None, task_id: str) -> None:
    if not notify:
        return
    addresses, port, key = notify
    msg = f"{task_id}|{os.getpid()}|{socket.gethostname()}|{time.time():.6f}".encode()
    packet = hmac.new(key, msg, hashlib.sha256).digest()[:16] + msg
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for addr in addresses:
                try:
                    s.sendto(packet, (addr, port))
                except OSError:
                    pass
    except OSError:
        pass


def control_file(control_dir: str | Path, task_id: str, suffix: str) -> Path:
    """``control_dir/TASK<suffix>`` (a cancel marker or a claim). Task ids arrive from the service:
    one like ``../../x`` must never name a file outside ``control_dir``, so it is checked here."""
    base = child_path(Path(control_dir), task_id, "task id")
    return base.with_name(base.name + suffix)


def run_in_worker(
    task_id: str,
    fid: str,
    body: bytes | None,
    payload: bytes,
    sandbox: str | None,
    allowed_methods: Allowlist | frozenset[str] | None,
    spec: dict[str, Any] | None,
    engine: dict[str, Any],
    control_dir: str | None,
    notify: tuple[list[str], int, bytes] | None,
    attempt: int = 0,
    python_sandbox: bool = False,
) -> dict[str, Any] | None:
    """Runs on a Parsl worker: claim the task, honour a cancel that came first, run, report RUNNING.

    The claim is ``control_dir/TASK.ATTEMPT.run`` (``host pid``), flock-ed while the task runs (one
    file per attempt: the worker of a lost attempt may still be running somewhere); the engine
    writes ``TASK.cancel`` *before* it looks at the claim, and the worker looks for ``TASK.cancel``
    *after* it made the claim, so one side always sees the other: the task never starts, or the
    engine sees it running (lock held) and kills this worker. Outside the lock (between tasks,
    when the worker may hold Parsl's own locks) it is never killed.
    """
    from tether.endpoint.execute import run_task

    claim = None
    path = ""
    if control_dir:
        path = str(control_file(control_dir, task_id, f".{attempt}.run"))
        try:
            import fcntl

            claim = open(path, "w")  # noqa: SIM115 - held for the task's duration
            fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
            claim.write(f"{socket.gethostname()} {os.getpid()}")
            claim.flush()
        except OSError:
            if claim is not None:
                claim.close()
            claim = None  # no (lockable) shared filesystem here: cancel cannot reach this worker
        if control_file(control_dir, task_id, ".cancel").exists():
            _release(claim, path)
            return None  # cancelled before it started: never run it
    _notify(notify, task_id)
    if not python_sandbox and sandbox:
        try:  # as on the local engines: Python functions start in the endpoint's tasks/ directory
            os.chdir(os.path.dirname(sandbox))
        except OSError:
            pass  # not shared with this node: stay where the worker pool started
    try:
        return run_task(task_id, fid, body, payload, sandbox, allowed_methods, chdir=python_sandbox, spec=spec,
                        engine=engine)
    finally:
        if claim is not None:
            _release(claim, path)


def _release(claim: Any, path: str) -> None:
    if claim is None:
        return
    try:
        os.unlink(path)
    except OSError:
        pass
    claim.close()  # drops the lock


# ------------------------------------------------------------------------------------------------
# configuration: build Parsl objects from YAML, with messages naming the file and the key
# ------------------------------------------------------------------------------------------------


def _require_parsl(source: str) -> None:
    try:
        import parsl  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"{source}: engine.type: the htex and mpi engines need Parsl, which is not installed "
            f"in {sys.prefix}; install it with: pip install 'tether[endpoint,parsl]'"
        ) from None


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=2, cutoff=0.75)
    if not close:
        lowered = {c.lower(): c for c in choices}
        close = [lowered[w] for w in difflib.get_close_matches(word.lower(), list(lowered), n=2, cutoff=0.6)]
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _classes(module: Any, base: type) -> dict[str, type]:
    return {
        n: c
        for n in getattr(module, "__all__", dir(module))
        if isinstance(c := getattr(module, n, None), type) and issubclass(c, base)
    }


def _params(cls: type) -> dict[str, inspect.Parameter]:
    return {
        n: p
        for n, p in inspect.signature(cls.__init__).parameters.items()
        if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """YAML has no tuples and reads an unquoted 00:10:00 as 600 (sexagesimal): fix both."""
    text = str(annotation)
    if isinstance(value, list) and "Tuple" in text:
        return tuple(value)
    if key == "walltime" and isinstance(value, int) and not isinstance(value, bool):
        return f"{value // 3600:02d}:{value % 3600 // 60:02d}:{value % 60:02d}"
    return value


def _build(
    kind: str,
    spec: Any,
    classes: dict[str, type],
    where: str,
    source: str,
    nested: dict[str, Any] | None = None,
) -> Any:
    """Instantiate a provider or launcher from ``{type: Name, **kwargs}``."""
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, dict):
        raise ConfigError(
            f"{source}: {where}: must be a mapping like {{type: {next(iter(classes))}, ...}}, "
            f"not {type(spec).__name__}"
        )
    name = spec.get("type")
    if not name:
        raise ConfigError(
            f"{source}: {where}: 'type' is missing; name a Parsl {kind}: {', '.join(sorted(classes))}"
        )
    cls = classes.get(name)
    if cls is None:
        raise ConfigError(
            f"{source}: {where}.type: {name!r} is not a Parsl {kind}"
            f"{_did_you_mean(str(name), list(classes))}. "
            f"Known: {', '.join(sorted(classes))}"
        )
    params = _params(cls)
    kwargs: dict[str, Any] = {}
    for key, value in spec.items():
        if key == "type":
            continue
        if key not in params:
            raise ConfigError(
                f"{source}: {where}.{key}: unknown keyword for {name}{_did_you_mean(key, list(params))}. "
                f"{name} takes: {', '.join(params)}"
            )
        if nested and key in nested:
            value = nested[key](value, f"{where}.{key}")
        kwargs[key] = _coerce(value, params[key].annotation, key)
    try:
        return cls(**kwargs)
    except Exception as exc:  # noqa: BLE001 - typeguard, ValueError, ...: all mean a bad value
        raise ConfigError(
            f"{source}: {where}: {name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) "
            f"is not valid: {exc}"
        ) from None


def provider_spec(engine: dict[str, Any]) -> Any:
    """The ``provider:`` section, with the defaults: LocalProvider; SimpleLauncher for the mpi engine."""
    spec = engine.get("provider", {"type": "LocalProvider"})
    if isinstance(spec, str):
        spec = {"type": spec}
    if engine.get("type") == "mpi" and isinstance(spec, dict) and "launcher" not in spec:
        spec = {**spec, "launcher": {"type": "SimpleLauncher"}}
    return spec


def build_provider(spec: Any, source: str, where: str = "engine.provider") -> Any:
    import parsl.launchers
    import parsl.providers
    from parsl.launchers.base import Launcher
    from parsl.providers.base import ExecutionProvider

    launchers = _classes(parsl.launchers, Launcher)
    providers = _classes(parsl.providers, ExecutionProvider)
    return _build(
        "provider",
        spec,
        providers,
        where,
        source,
        nested={"launcher": lambda v, w: _build("launcher", v, launchers, w, source)},
    )


def executor_class(kind: str) -> type:
    if kind == "mpi":
        from parsl.executors import MPIExecutor

        return MPIExecutor
    from parsl.executors import HighThroughputExecutor

    return HighThroughputExecutor


def validate_engine(engine: dict[str, Any], source: str) -> None:
    """Check an htex/mpi ``engine:`` section against the installed Parsl; raise ConfigError in words."""
    _require_parsl(source)
    kind = engine.get("type")
    cls = executor_class(kind)
    params = _params(cls)
    allowed = [k for k in params if k not in RESERVED and k != "provider"] + list(ENGINE_KEYS)
    for key in engine:
        if key.startswith("_"):
            continue
        if key not in allowed:
            raise ConfigError(
                f"{source}: engine.{key}: unknown key for the {kind} engine{_did_you_mean(key, allowed)}. "
                f"Allowed: {', '.join(allowed)}"
            )
    strategy = engine.get("strategy", "simple")
    if strategy not in STRATEGIES:
        raise ConfigError(
            f"{source}: engine.strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}"
            f"{_did_you_mean(str(strategy), list(STRATEGIES))}"
        )
    for key in ("max_idletime", "strategy_period"):
        if key in engine and (not isinstance(engine[key], (int, float)) or engine[key] < 0):
            raise ConfigError(
                f"{source}: engine.{key}: must be a number of seconds >= 0, not {engine[key]!r}"
            )
    if kind == "mpi":
        from parsl.executors.high_throughput.mpi_prefix_composer import VALID_LAUNCHERS

        launcher = engine.get("mpi_launcher", "mpiexec")
        if launcher not in VALID_LAUNCHERS:
            raise ConfigError(
                f"{source}: engine.mpi_launcher: {launcher!r} is not one of {', '.join(VALID_LAUNCHERS)}"
                f"{_did_you_mean(str(launcher), list(VALID_LAUNCHERS))}"
            )
    provider = build_provider(provider_spec(engine), source)
    if kind == "mpi":
        from parsl.launchers import SimpleLauncher

        if not isinstance(getattr(provider, "launcher", None), SimpleLauncher):
            raise ConfigError(
                f"{source}: engine.provider.launcher: the mpi engine needs "
                f"launcher: {{type: SimpleLauncher}} (one worker pool on the first node of a block; "
                f"tasks reach the other nodes with "
                f"{engine.get('mpi_launcher', 'mpiexec')}), not {type(provider.launcher).__name__}"
            )
    _executor_kwargs(engine, cls, source)  # types that typeguard can check without starting anything


def _executor_kwargs(engine: dict[str, Any], cls: type, source: str) -> dict[str, Any]:
    params = _params(cls)
    out = {}
    for key, value in engine.items():
        if key in ENGINE_KEYS or key.startswith("_") or key == "workers":
            continue
        value = _coerce(value, params[key].annotation, key)
        hint = typing.get_type_hints(cls.__init__).get(key)
        if hint is not None:
            try:
                import typeguard

                typeguard.check_type(value, hint)
            except ImportError:
                pass
            except Exception as exc:  # noqa: BLE001 - typeguard.TypeCheckError
                raise ConfigError(
                    f"{source}: engine.{key}: {value!r} has the wrong type for "
                    f"{cls.__name__}({key}=...): {exc}"
                ) from None
        out[key] = value
    return out


def launch_commands() -> tuple[str, list[str]]:
    """Worker-pool and interchange commands that run under *this* interpreter, not via PATH.

    Parsl's defaults are the bare script names ``process_worker_pool.py`` and ``interchange.py``;
    both modules run with ``python -m``, so that is substituted and Parsl's template kept.
    """
    from parsl.executors.high_throughput import executor as htex_mod

    default: str = htex_mod.DEFAULT_LAUNCH_CMD
    script = "process_worker_pool.py"
    if not default.startswith(script):
        raise RuntimeError(f"unexpected Parsl DEFAULT_LAUNCH_CMD: {default[:60]!r}")
    module = "parsl.executors.high_throughput.process_worker_pool"
    launch = f"{shlex.quote(sys.executable)} -m {module}{default[len(script) :]}"
    return launch, [sys.executable, "-m", "parsl.executors.high_throughput.interchange"]


def _host_addresses() -> set[str]:
    """The addresses workers may reach this host at, as Parsl's default finds them, minus its last
    resort: asking api.ipify.org over the internet (a third party, and up to 30 s on a login node
    without outside DNS) for an address that compute nodes behind NAT could not use anyway."""
    import psutil
    from parsl import addresses

    found: set[str] = set()
    for interface in psutil.net_if_addrs():
        try:
            found.add(addresses.address_by_interface(interface))
        except Exception:  # noqa: BLE001 - no IPv4 address on it
            continue
    for finder in (addresses.address_by_hostname, addresses.address_by_route):
        try:
            found.add(finder())
        except Exception:  # noqa: BLE001
            continue
    return found or {"127.0.0.1"}


def _describe(exc: BaseException) -> str:
    from parsl.executors.errors import BadStateException

    if isinstance(exc, BadStateException):
        return f"the engine failed: {getattr(exc, 'reason', exc)}"
    return f"{type(exc).__name__}: {exc}"


#: Give up after this many blocks in a row failed without their worker pool ever connecting.
BLOCK_FAILURES_TO_GIVE_UP = 3


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
    try:
        from parsl.jobs.error_handlers import _get_error

        error: Exception = _get_error(dict(enumerate(recent)))
    except Exception:  # noqa: BLE001 - a private helper of Parsl's; the gist is enough
        error = RuntimeError("; ".join(s.message or f"exit code {s.exit_code}" for s in recent))
    executor.set_bad_state_and_fail_all(
        RuntimeError(
            f"the last {len(recent)} blocks failed before their worker pools connected (check the provider "
            f"settings and worker_init; the jobs' output is in parsl/submit_scripts/): {error}"
        )
    )


def _guard_scale_in(executor: Any) -> None:
    """Parsl's HTEX ``scale_in(0, max_idletime=...)`` kills one idle block anyway (its loop only stops
    at ``len == blocks``), and htex_auto_scale asks for exactly that whenever a block has more slots
    than tasks, e.g. a 2-worker block still starting with 1 task queued. Asking for none kills none."""
    original = executor.scale_in

    def scale_in(blocks: int, *args: Any, **kwargs: Any) -> list[str]:
        return [] if blocks <= 0 else original(blocks, *args, **kwargs)

    executor.scale_in = scale_in


# ------------------------------------------------------------------------------------------------
# the engine
# ------------------------------------------------------------------------------------------------


@dataclass
class _Task:
    spec: TaskSpec
    future: Any = None
    running: bool = False
    host: str | None = None
    pid: int | None = None
    tries: int = 0


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, engine: ParslEngine):
        self.engine = engine

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.engine._datagram(data)


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
        self.control_dir = self.run_dir / "control"
        self.control_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in self.control_dir.iterdir():  # markers of a previous run
            stale.unlink(missing_ok=True)
        self.tasks: dict[str, _Task] = {}
        self.cancelled: dict[str, Any] = {}  # task id -> its Parsl future (until Parsl lets go of it)
        self.host = socket.gethostname()
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
        # the RUNNING channel (see module docstring)
        bind = "127.0.0.1" if self._local_only() else (self.config.get("address") or "0.0.0.0")
        self._key = secrets.token_bytes(32)
        self._transport, _ = await self.loop.create_datagram_endpoint(
            lambda: _Datagrams(self), local_addr=(bind, 0)
        )
        port = self._transport.get_extra_info("sockname")[1]
        addresses = ["127.0.0.1"] if self._local_only() else sorted(self.executor.all_addresses)
        self._notify = (addresses, port, self._key)
        await asyncio.to_thread(self._refresh_capacity)
        log.info(
            "%s engine started: %s, run dir %s",
            self.kind,
            type(self.executor.provider).__name__,
            self.run_dir,
        )

    def _run_dir(self) -> Path:
        if self.config.get("_endpoint_dir"):
            return Path(self.config["_endpoint_dir"]) / "parsl"
        from tether.home import tether_home

        return tether_home() / "parsl" / uuid.uuid4().hex[:8]

    def _local_only(self) -> bool:
        addr = self.config.get("address")
        if addr:
            return addr.startswith("127.") or addr == "localhost"
        return type(self.executor.provider).__name__ in LOCAL_PROVIDERS

    def _start_parsl(self, source: str) -> None:
        from parsl.jobs.strategy import Strategy

        cls = executor_class(self.kind)
        kwargs = _executor_kwargs(self.config, cls, source)
        provider = build_provider(provider_spec(self.config), source)
        self.provider_name = type(provider).__name__
        launch, interchange = launch_commands()
        kwargs.setdefault("launch_cmd", launch)
        if self.provider_name in LOCAL_PROVIDERS:
            kwargs.setdefault("address", "127.0.0.1")
        kwargs.setdefault("worker_logdir_root", str(self.run_dir / "workers"))
        if self.kind == "mpi":
            self._prepare_local_mpi(provider)
        else:
            kwargs.setdefault("interchange_launch_cmd", interchange)
        probe = "address" not in kwargs
        if probe:  # constructed with a placeholder, then given this host's addresses (see _host_addresses)
            kwargs["address"] = "127.0.0.1"
        label = f"tether-{self.kind}"
        kwargs.setdefault("block_error_handler", tolerant_block_errors)  # true/false in the YAML: Parsl's own
        try:
            executor = cls(label=label, provider=provider, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(
                f"{source}: engine: {cls.__name__}(...) refused the configuration: {exc}"
            ) from None
        if self.kind == "mpi":
            # MPIExecutor types interchange_launch_cmd as str, HTEX needs a list: set it after construction
            executor.interchange_launch_cmd = interchange
        if probe:
            executor.address = None  # the interchange listens on every interface, as Parsl's default
            executor.all_addresses = _host_addresses()
        executor.run_id = str(uuid.uuid4())
        executor.run_dir = str(self.run_dir)
        if hasattr(provider, "script_dir"):
            provider.script_dir = str(self.run_dir / "submit_scripts")
            os.makedirs(provider.script_dir, exist_ok=True)
        self.executor = executor
        executor.start()
        _guard_scale_in(executor)
        self.strategy = Strategy(
            strategy=self.config.get("strategy", "simple"),
            max_idletime=float(self.config.get("max_idletime", 120)),
        )
        self.strategy.add_executors([executor])
        self.strategy_period = float(self.config.get("strategy_period", 1.0))
        self._scaler = threading.Thread(target=self._scaling_loop, name="tether-parsl-scaling", daemon=True)
        self._scaler.start()

    def _prepare_local_mpi(self, provider: Any) -> None:
        """Parsl's MPI mode takes its node list from Slurm or PBS; on one host (LocalProvider) give it
        a PBS-style node file naming this host, once per node of the block."""
        if self.provider_name not in LOCAL_PROVIDERS:
            return
        nodefile = self.run_dir / "local_nodefile"
        nodefile.write_text("localhost\n" * int(getattr(provider, "nodes_per_block", 1) or 1))
        init = getattr(provider, "worker_init", "") or ""
        provider.worker_init = (
            f"export PBS_NODEFILE={shlex.quote(str(nodefile))}; unset SLURM_NODELIST; {init}"
        )

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
                    ex = self.executor
                    ex.poll_facade()
                    ex.handle_errors(ex.status_facade)
                    self.strategy.strategize([ex])
                except Exception:  # noqa: BLE001 - keep scaling; Parsl logs the details
                    log.exception("scaling step failed")
                if self.executor.bad_state_is_set and self.failed_state is None:
                    self.failed_state = str(self.executor.executor_exception)
                    log.error("the %s engine failed: %s", self.kind, self.failed_state)

    def _interchange_died(self) -> bool:
        """Parsl does not watch its interchange; without it every task would wait forever. Fail them all."""
        proc = self.executor.interchange_proc
        code = proc.poll() if proc is not None else None
        if code is None:
            return False
        self.failed_state = (
            f"Parsl's interchange process (pid {proc.pid}) exited with code {code}; see "
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
        for tid in list(self.tasks):
            for attempt in range(self.tasks[tid].tries + 1):
                self._kill_claimed(control_file(self.control_dir, tid, f".{attempt}.run"))
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
            left = _marked_processes(RUN_MARK, self._run_mark)
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
                    ex.scale_in_facade(len(ex.status_facade))  # cancels the batch jobs (pilot jobs)
                else:  # Parsl's scale-in asks the (maybe dead) interchange first: cancel the jobs directly
                    from parsl.jobs.states import TERMINAL_STATES

                    live = [
                        ex.blocks_to_job_id[b]
                        for b, st in ex.status_facade.items()
                        if st.state not in TERMINAL_STATES and b in ex.blocks_to_job_id
                    ]
                    if live:
                        ex.provider.cancel(live)
            except Exception:  # noqa: BLE001
                log.exception("scaling in at stop failed")
            try:
                for pipe in ("outgoing_q", "incoming_q"):  # stop means now: drop unsent task messages
                    sock = getattr(getattr(ex, pipe, None), "zmq_socket", None)
                    if sock is not None:
                        import zmq

                        sock.setsockopt(zmq.LINGER, 0)
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

    def _resource_specification(self, spec: dict[str, Any] | None) -> dict[str, Any]:
        spec = dict(spec or {})
        if self.kind != "mpi":
            return {k: v for k, v in spec.items() if k == "priority"}
        from parsl.executors.high_throughput.mpi_prefix_composer import validate_resource_spec

        out = {
            k: spec[k] for k in ("num_nodes", "ranks_per_node", "num_ranks", "launcher_options") if k in spec
        }
        nodes = int(out.setdefault("num_nodes", 1))
        per_block = int(getattr(self.executor.provider, "nodes_per_block", 1) or 1)
        if nodes > per_block:  # Parsl would keep it in its backlog forever
            from tether.errors import InvalidResourceSpecification

            raise InvalidResourceSpecification(
                f"num_nodes={nodes} is more than a block of this endpoint has (nodes_per_block={per_block}); "
                f"ask for at most {per_block} node(s), or raise the provider's nodes_per_block"
            )
        if "num_ranks" in out and "ranks_per_node" not in out:
            out["ranks_per_node"] = -(-int(out["num_ranks"]) // nodes)  # ceil: Parsl would make it a float
        out.setdefault("ranks_per_node", 1)
        out.setdefault("num_ranks", nodes * int(out["ranks_per_node"]))
        validate_resource_spec(out)
        return out

    def _hand_over(self, entry: _Task) -> None:
        task = entry.spec
        try:
            if self.failed_state is not None:
                raise RuntimeError(
                    f"the {self.kind} engine failed and runs no more tasks: {self.failed_state}. "
                    f"Fix the cause and restart the endpoint"
                )
            control_file(self.control_dir, task.id, "")  # an id that could leave control/ fails the task here
            rspec = self._resource_specification(task.spec)
            fut = self.executor.submit(
                run_in_worker,
                rspec,
                task.id,
                task.function_id,
                task.function_body,
                task.payload,
                str(task.sandbox),
                self.allowed_methods,
                task.spec,
                self.engine_info(),
                str(self.control_dir),
                self._notify,
                entry.tries,
                self.python_sandbox,
            )
        except Exception as exc:  # noqa: BLE001 - a bad spec, a serialization error, a dead executor
            from tether.endpoint.execute import failure

            self.tasks.pop(task.id, None)
            self.on_result(failure(task.id, exc))
            return
        entry.future = fut
        fut.add_done_callback(lambda f, tid=task.id: self.loop.call_soon_threadsafe(self._done, tid, f))
        if not self._blocks_up():
            self._kick.set()  # no block to run it: let the strategy scale out now, not in a period

    def _blocks_up(self) -> bool:
        from parsl.jobs.states import TERMINAL_STATES

        return any(s.state not in TERMINAL_STATES for s in self.executor.status_facade.values())

    def _done(self, task_id: str, fut: Any) -> None:
        if task_id in self.cancelled:
            if self.cancelled[task_id] is fut:
                del self.cancelled[task_id]
                control_file(self.control_dir, task_id, ".cancel").unlink(missing_ok=True)
            return
        entry = self.tasks.get(task_id)
        if entry is None or entry.future is not fut:
            return
        exc = fut.exception()
        if exc is None:
            record = fut.result()
            self.tasks.pop(task_id, None)
            if record is not None:
                self.on_result(record)
            return
        from tether.endpoint.execute import failure

        lost = self._loss_message(exc)
        if lost:
            # the worker of a lost pool lives on, orphaned, until its task ends (or for ever, if
            # it waits on the dead pool): a lost attempt's worker on this host is killed now
            for attempt in range(entry.tries + 1):
                self._kill_claimed(control_file(self.control_dir, task_id, f".{attempt}.run"))
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
            from .process import WorkerLost

            err: BaseException = WorkerLost(
                lost + (f" (tried {entry.tries + 1} times)" if entry.tries else "")
            )
        else:
            err = RuntimeError(f"the {self.kind} engine could not run this task: {_describe(exc)}")
        self.on_result(failure(task_id, err))

    def _loss_message(self, exc: BaseException) -> str | None:
        from parsl.executors.high_throughput.errors import ManagerLost, WorkerLost

        if isinstance(exc, WorkerLost):
            return (
                f"the Parsl worker running this task (worker {exc.worker_id} on host {exc.hostname}) died: "
                f"out of "
                f"memory, a crash in native code, os._exit in the task, or it was killed"
            )
        if isinstance(exc, ManagerLost):
            return (
                f"the Parsl worker pool running this task (manager {exc.manager_id.decode(errors='replace')} "
                f"on host {exc.hostname}) stopped answering: its node failed, or its batch job was killed "
                f"or ran out of "
                f"walltime"
            )
        return None

    # --- RUNNING datagrams ------------------------------------------------------------------------
    def _datagram(self, data: bytes) -> None:
        mac, msg = data[:16], data[16:]
        if not hmac.compare_digest(mac, hmac.new(self._key, msg, hashlib.sha256).digest()[:16]):
            return
        try:
            task_id, pid, host, ts = msg.decode().split("|")
            pid_i, ts_f = int(pid), float(ts)
        except ValueError:
            return
        entry = self.tasks.get(task_id)
        if entry is None or entry.running:
            return
        entry.running, entry.host, entry.pid = True, host, pid_i
        self.on_running(task_id, ts_f)

    # --- cancellation -----------------------------------------------------------------------------
    def cancel(self, task_id: str) -> None:
        entry = self.tasks.pop(task_id, None)
        if entry is None:
            return
        if entry.future is not None and not entry.future.done():
            self.cancelled[task_id] = entry.future
            try:  # the marker first, then look at the claim: one of the two sides sees the other
                control_file(self.control_dir, task_id, ".cancel").write_text("")
            except OSError as exc:
                log.warning("cannot write cancel marker for %s: %s", task_id, exc)
            for attempt in range(entry.tries + 1):  # an earlier, lost attempt may still run too
                self._kill_claimed(control_file(self.control_dir, task_id, f".{attempt}.run"))
        self.on_result(cancelled_record(task_id, time.time()))

    def _kill_claimed(self, claim: Path) -> None:
        """Kill the worker that holds ``claim`` locked (it runs the task right now), if it is on this host."""
        import fcntl

        try:
            fh = open(claim)  # noqa: SIM115
        except OSError:
            return  # not started (it will see the marker), or finished
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return  # not locked: finished, or between open and lock (it will see the marker)
            except OSError:
                pass
            host, _, pid = fh.read().partition(" ")
            if host != self.host:
                log.warning(
                    "task on host %s cannot be killed from here; it runs to completion, its result is "
                    "dropped",
                    host,
                )
                return
            try:
                self._kill(int(pid), claim)
            except ValueError:
                pass

    def _kill(self, pid: int, claim: Path | None = None) -> None:
        """Kill a Parsl worker process of this host and everything it started: a child of a
        worker pool, or (its pool lost) an orphan that still holds the task's ``claim`` lock."""
        try:
            import psutil

            proc = psutil.Process(pid)
            parent = proc.parent()
            in_pool = parent is not None and "process_worker_pool" in " ".join(parent.cmdline())
            if proc.uids().real != os.getuid() or not (in_pool or (claim is not None and _holds_flock(pid, claim))):
                log.warning("pid %s is not a Parsl worker of ours; not killing it", pid)
                return
            victims = [proc, *proc.children(recursive=True)]
        except Exception as exc:  # noqa: BLE001 - gone already
            log.info("worker %s not killed: %s", pid, exc)
            return
        own_group = os.getpgid(pid)
        for p in victims:
            try:
                if p.pid != pid and p.pid != own_group and os.getpgid(p.pid) == p.pid:
                    os.killpg(p.pid, signal.SIGKILL)  # a group it started (a shell command and its children)
                p.kill()
            except Exception:  # noqa: BLE001 - already gone
                pass

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
            states = [s.state for s in self.executor.status_facade.values()]
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


def _holds_flock(pid: int, path: Path) -> bool:
    """Whether process ``pid`` holds a flock on ``path`` (Linux ``/proc/locks``; False elsewhere):
    proof that an orphaned process is the worker that claimed a task, not a reused pid."""
    try:
        inode = os.stat(path).st_ino
        with open("/proc/locks") as fh:
            for line in fh:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF" ("->" marks a waiter)
                if len(fields) < 6 or fields[1] != "FLOCK" or "->" in fields:
                    continue
                if int(fields[4]) == pid and int(fields[5].rsplit(":", 1)[1]) == inode:
                    return True
    except (OSError, ValueError, IndexError):
        return False
    return False


#: the environment variable that marks the processes of one engine run (see ParslEngine.start)
RUN_MARK = "TETHER_PARSL_RUN"


def _marked_processes(name: str, value: str) -> list[Any]:
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
