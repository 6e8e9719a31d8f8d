"""The ``engine:`` section of an htex/mpi endpoint's YAML -> Parsl objects, checked in words.

Any class in ``parsl.providers`` and ``parsl.launchers`` may be named, with its own keyword
arguments; the executor takes HighThroughputExecutor's (or MPIExecutor's) keywords. Every
mistake is a ConfigError naming the file and the key, with the close matches, at
``tether endpoint configure``/``start`` rather than when the first block is submitted. Also here:
a task's resource specification as Parsl's executor takes it. Parsl is imported only inside
functions: this module checks configurations where Parsl may be missing (and says so).
"""

from __future__ import annotations

import difflib
import inspect
import os
import shlex
import sys
import typing
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tether.errors import ConfigError, InvalidResourceSpecification
from tether.resources import MPI_KEYS, mpi_layout, validate_resource_specification

#: Engine keys that are not executor keyword arguments (Parsl's Config has them for the DFK).
ENGINE_KEYS = {
    "type": "htex or mpi",
    "provider": "the Parsl provider: {type: SlurmProvider, ...its keyword arguments}",
    "strategy": "Parsl scaling strategy: simple (default, as Parsl's), htex_auto_scale, none",
    "max_idletime": "seconds a block may sit idle before htex_auto_scale scales it in (default 120)",
    "strategy_period": "seconds between scaling decisions (default 1)",
    "container": "run the worker pools in a container image: {type: podman, image: ..., options: [...]}",
    "outlive_daemon": "true (default): Parsl runs in an engine host process that outlives the daemon, so a restart "
                      "or a killed daemon kills no task; false: inside the daemon, and a restart stops it",
}
#: Executor arguments the engine sets itself (not configurable).
RESERVED = {"label", "storage_access", "remote_monitoring_radio", "manager_selector"}
STRATEGIES = ("simple", "htex_auto_scale", "none")
LOCAL_PROVIDERS = ("LocalProvider",)


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
    executor_kwargs(engine, cls, source)  # types that typeguard can check without starting anything


def executor_kwargs(engine: dict[str, Any], cls: type, source: str) -> dict[str, Any]:
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


def host_addresses() -> set[str]:
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



def build_executor(kind: str, engine: dict[str, Any], run_dir: Path, source: str, block_error_handler: Any) -> Any:
    """The executor an ``engine:`` section describes, not yet started: its provider, launch commands
    under this interpreter, its logs and submit scripts under ``run_dir``, and (with no ``address``
    given) the addresses of this host that workers may use to reach the interchange."""
    from . import _compat

    cls = executor_class(kind)
    kwargs = executor_kwargs(engine, cls, source)
    provider = build_provider(provider_spec(engine), source)
    local = type(provider).__name__ in LOCAL_PROVIDERS
    launch, interchange = _compat.launch_commands(worker_pool_in_image(engine))
    kwargs.setdefault("launch_cmd", launch)
    if local:
        kwargs.setdefault("address", "127.0.0.1")
    kwargs.setdefault("worker_logdir_root", str(run_dir / "workers"))
    if kind == "mpi":
        if local:
            _local_mpi_nodefile(provider, run_dir)
    else:
        kwargs.setdefault("interchange_launch_cmd", interchange)
    probe = "address" not in kwargs
    if probe:  # constructed with a placeholder, then given this host's addresses (see host_addresses)
        kwargs["address"] = "127.0.0.1"
    kwargs.setdefault("block_error_handler", block_error_handler)  # true/false in the YAML: Parsl's own
    try:
        executor = cls(label=f"tether-{kind}", provider=provider, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{source}: engine: {cls.__name__}(...) refused the configuration: {exc}") from None
    if kind == "mpi":
        # MPIExecutor types interchange_launch_cmd as str, HTEX needs a list: set it after construction
        _compat.set_interchange_command(executor, interchange)
    if probe:
        _compat.listen_on_all_interfaces(executor, host_addresses())
    executor.run_id = str(uuid.uuid4())
    executor.run_dir = str(run_dir)
    if hasattr(provider, "script_dir"):
        provider.script_dir = str(run_dir / "submit_scripts")
        os.makedirs(provider.script_dir, exist_ok=True)
    return executor


def worker_pool_in_image(engine: dict[str, Any]) -> Callable[[str], str] | None:
    """With a ``container:``, the worker pools start in the image (see :mod:`tether.endpoint.container`):
    the launch command's template from the worker pool's arguments. None: on the host."""
    from tether.endpoint.container import engine_container, shared_dirs

    container = engine_container(engine)
    if container is None:
        return None
    shared = shared_dirs(engine)
    return lambda arguments: container.shell_command(shlex.quote(container.python) + arguments, shared,
                                                      template=True)


def _local_mpi_nodefile(provider: Any, run_dir: Path) -> None:
    """Parsl's MPI mode takes its node list from Slurm or PBS; on one host (LocalProvider) give it
    a PBS-style node file naming this host, once per node of the block."""
    nodefile = run_dir / "local_nodefile"
    nodefile.write_text("localhost\n" * int(getattr(provider, "nodes_per_block", 1) or 1))
    init = getattr(provider, "worker_init", "") or ""
    provider.worker_init = f"export PBS_NODEFILE={shlex.quote(str(nodefile))}; unset SLURM_NODELIST; {init}"


def resource_specification(kind: str, spec: dict[str, Any] | None, nodes_per_block: int) -> dict[str, Any]:
    """A task's resource specification as the executor takes it: ``priority`` alone for htex; for
    mpi the rank layout resolved by :func:`tether.resources.mpi_layout` (one rank per node when the
    task names no ranks), refused in words when a block is too small for it (Parsl would keep the
    task in its backlog forever)."""
    spec = dict(spec or {})
    if kind != "mpi":
        return {k: v for k, v in spec.items() if k == "priority"}
    from parsl.executors.high_throughput.mpi_prefix_composer import validate_resource_spec

    wanted = validate_resource_specification({k: spec[k] for k in MPI_KEYS if k in spec})
    nodes = wanted.setdefault("num_nodes", 1)
    if nodes > nodes_per_block:
        raise InvalidResourceSpecification(
            f"num_nodes={nodes} is more than a block of this endpoint has (nodes_per_block={nodes_per_block}); "
            f"ask for at most {nodes_per_block} node(s), or raise the provider's nodes_per_block"
        )
    if "num_ranks" not in wanted:
        wanted.setdefault("ranks_per_node", 1)
    out = mpi_layout(wanted).as_spec()
    validate_resource_spec(out)
    return out
