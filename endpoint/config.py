"""Endpoint configuration: ``$TETHER_HOME/endpoints/NAME/config.yaml``, validated in words.

A mistake in the file is reported as ``<file>: <key>: <what is wrong>`` with a suggestion for
misspelt keys, before the endpoint connects anywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether.configfile import parse_yaml
from tether.configfile import validate as validate_file
from tether.errors import ConfigError
from tether.home import tether_home
from tether.ids import check_name, child_path

ENGINE_TYPES = ("thread", "process", "htex", "mpi")
#: Engines built on Parsl: their keys are checked against the installed Parsl (see engines/parsl/config.py).
PARSL_ENGINE_TYPES = ("htex", "mpi")

#: The schema of config.yaml. Engines that need more keys (Parsl's) extend ``engine``.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "display_name": {"type": "string"},
        "engine": {
            "type": "object",
            "required": ["type"],
            "properties": {"type": {"enum": list(ENGINE_TYPES)}},
            # the Parsl engines: executor/provider keys are checked against Parsl itself (validate_engine);
            # every other type (thread, process, or a misspelt one): exactly these keys
            "if": {"properties": {"type": {"enum": list(PARSL_ENGINE_TYPES)}}, "required": ["type"]},
            "then": {"properties": {"provider": {"type": ["object", "string"]}}},
            "else": {
                "properties": {
                    "type": {},  # checked once, above
                    "workers": {"type": "integer", "minimum": 1, "maximum": 4096},
                    "prefetch": {"type": "integer", "minimum": 0, "maximum": 1000},
                    # how MPIFunction starts ranks on this host (see core/mpi.py)
                    "mpi_launcher": {"enum": ["mpiexec", "srun", "aprun"]},
                    # workers in a container image (endpoint/container.py)
                    "container": {"type": "object"},
                },
                "additionalProperties": False,
            },
        },
        "heartbeat_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
        "retries_on_worker_loss": {"type": "integer", "minimum": 0, "maximum": 100},
        "python_sandbox": {"type": "boolean"},
        "allowed_serialization_methods": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "allowed_functions": {"type": ["array", "null"], "items": {"type": "string"}},
        "max_result_bytes": {"type": "integer", "minimum": 1},
        "max_payload_bytes": {"type": "integer", "minimum": 1},
        # results kept on the endpoint (docs/payloads.md): 0 bytes keeps none
        "kept_results_max_bytes": {"type": "integer", "minimum": 0},
        "kept_results_retention_s": {"type": "number", "exclusiveMinimum": 0},
        "kept_results_dir": {"type": "string", "minLength": 1},
        # multi-user endpoints (docs/multi-user.md)
        "multi_user": {"type": "boolean"},
        "identity_mapping": {"type": "string", "minLength": 1},
        "user_config_template": {"type": "string", "minLength": 1},
        "user_config_schema": {"type": "string", "minLength": 1},
        "min_uid": {"type": "integer", "minimum": 1},
        "max_uid": {"type": "integer", "minimum": 1},
        "allow_nologin_shells": {"type": "boolean"},
        "idle_timeout_s": {"type": "number", "exclusiveMinimum": 0},
        "allowed_users": {"type": "array", "items": {"type": "string", "minLength": 1}},
        "audit_log": {"type": "string", "minLength": 1},
        "user_log_max_bytes": {"type": "integer", "minimum": 4096},
        "max_user_endpoints_per_user": {"type": "integer", "minimum": 1},
        "user_log_bytes_per_s": {"type": "integer", "minimum": 1024},
        # PAM account checks and sessions for user endpoints (endpoint/pam.py)
        "pam": {"type": "object", "additionalProperties": False, "properties": {
            "enabled": {"type": "boolean"}, "service": {"type": "string", "pattern": "^[A-Za-z0-9_.-]+$"}}},
        # which identities may send tasks (service/authentication_policy.py)
        "authentication_policy": {"type": "object", "additionalProperties": False, "properties": {
            "allowed_domains": {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 100},
            "max_session_age_s": {"type": "number", "exclusiveMinimum": 0}}},
        # environments built for tasks that ask for them (endpoint/environments.py, docs/environments.md)
        "environments": {"type": "object", "additionalProperties": False, "properties": {
            "enabled": {"type": "boolean"},
            "index_url": {"type": "string", "pattern": "^(https?|file)://"},
            "cache_dir": {"type": "string", "minLength": 1},
            "max_bytes": {"type": "integer", "minimum": 0},
            "interpreters": {"type": "array", "items": {"type": "string", "minLength": 1}},
            "workers": {"type": "integer", "minimum": 1, "maximum": 4096},
            "idle_timeout_s": {"type": "number", "exclusiveMinimum": 0},
            "build_timeout_s": {"type": "number", "exclusiveMinimum": 0},
            "uv": {"type": "string", "minLength": 1},
            "system_certs": {"type": "boolean"}}},
        # the administrator's commands around the daemon (endpoint/hooks.py)
        "endpoint_setup": {"type": "string", "minLength": 1},
        "endpoint_teardown": {"type": "string", "minLength": 1},
        "endpoint_hook_timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 86400},
    },
}


@dataclass
class EndpointConfig:
    """A validated endpoint configuration (defaults fill what the file leaves out)."""

    name: str
    engine: dict[str, Any] = field(default_factory=lambda: {"type": "process", "workers": os.cpu_count() or 1})
    heartbeat_s: float = 5.0
    retries_on_worker_loss: int = 0
    #: run each Python function in a directory of its own (shell commands always get one);
    #: off by default because a mkdir+rmdir per task is a large share of a short task's cost
    python_sandbox: bool = False
    allowed_serialization_methods: list[str] = field(default_factory=lambda: ["cloudpickle"])
    allowed_functions: list[str] | None = None
    max_result_bytes: int | None = None
    #: the largest serialized arguments (and function body) this endpoint accepts; larger tasks fail in words
    max_payload_bytes: int | None = None
    #: results over the blob threshold stay here (in ``kept_results_dir``, default
    #: ``<endpoint>/results``) until released, up to this many bytes; past it they go to the
    #: service as blobs, as every result did before; 0 keeps none
    kept_results_max_bytes: int = 20 * 1024**3
    #: a kept result nobody released is freed this long after it was computed (7 days)
    kept_results_retention_s: float = 7 * 24 * 3600.0
    kept_results_dir: str | None = None
    display_name: str | None = None
    # multi-user endpoints: files are relative to the endpoint's directory
    multi_user: bool = False
    identity_mapping: str = "identity_mapping.json"
    user_config_template: str = "user_config_template.yaml.j2"
    user_config_schema: str = "user_config_schema.json"
    min_uid: int = 1000
    #: accounts above this (nobody is 65534) are refused, as are no-login shells unless allowed
    max_uid: int = 60000
    allow_nologin_shells: bool = False
    idle_timeout_s: float = 600.0
    allowed_users: list[str] = field(default_factory=list)  # ["*"]: every user of the service
    audit_log: str = "audit.log"
    #: each user endpoint's output: bytes per log file (one previous file is kept), and the
    #: average rate it is read at (a faster writer blocks on its own output)
    user_log_max_bytes: int = 16 * 1024 * 1024
    #: user endpoints one identity may have running at once (one per distinct user_endpoint_config)
    max_user_endpoints_per_user: int = 8
    user_log_bytes_per_s: int = 1024 * 1024
    #: {enabled: bool, service: str}: PAM account checks before a user endpoint starts and a PAM
    #: session around it (endpoint/pam.py)
    pam: dict[str, Any] = field(default_factory=dict)
    #: {allowed_domains: [...], max_session_age_s: N}: which identities may send tasks, checked by
    #: the service before a task reaches the endpoint (service/authentication_policy.py)
    authentication_policy: dict[str, Any] = field(default_factory=dict)
    #: shell commands run before the daemon serves and after it stops (see endpoint/hooks.py)
    endpoint_setup: str | None = None
    endpoint_teardown: str | None = None
    endpoint_hook_timeout_s: float = 300.0
    #: {enabled, index_url, cache_dir, max_bytes, interpreters, workers, idle_timeout_s, ...}:
    #: environments built for tasks that ask for one (endpoint/environments.py); off by default
    environments: dict[str, Any] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return endpoint_dir(self.name)


def endpoint_dir(name: str) -> Path:
    """``$TETHER_HOME/endpoints/NAME``; a name that could leave that directory (``..``, ``a/b``, an
    absolute path) is refused here, where it becomes a path, whatever checked it before."""
    return child_path(tether_home() / "endpoints", name, "endpoint name", check=check_name)


def validate(data: Any, source: str, schema: dict[str, Any] = SCHEMA) -> None:
    """Check an endpoint configuration; every problem is named (see :mod:`tether.configfile`)."""
    validate_file(data, source, schema, "endpoint configuration")


def load_config(name: str) -> EndpointConfig:
    path = endpoint_dir(name) / "config.yaml"
    if not path.exists():
        raise ConfigError(
            f"endpoint {name!r} is not configured ({path} is missing); run 'tether endpoint configure {name}'"
        )
    return parse_config(name, path.read_text(), str(path))


def parse_config(name: str, text: str, path: str) -> EndpointConfig:
    """Validate YAML text as endpoint ``name``'s configuration (``path`` names it in messages)."""
    data = parse_yaml(text, str(path)) or {}
    validate(data, str(path))
    engine = data.get("engine") or {}
    if engine.get("type") in PARSL_ENGINE_TYPES:
        from .engines.parsl.config import validate_engine

        validate_engine(engine, str(path))
    if "container" in engine:
        from .container import check_runtime, parse_container

        container = parse_container(engine["container"], str(path))
        if engine.get("type") == "thread":
            raise ConfigError(f"{path}: engine.container: the thread engine runs tasks inside the endpoint's own "
                              f"process, which cannot enter an image; use type: process (or htex, mpi)")
        if engine.get("type") not in PARSL_ENGINE_TYPES or _local_provider(engine):
            check_runtime(container, str(path))  # elsewhere, workers start on other hosts
    cfg = EndpointConfig(name=name)
    for key, value in data.items():
        if key == "engine":
            if value.get("type") in PARSL_ENGINE_TYPES:  # where Parsl keeps its run directory; the file, for messages
                cfg.engine = {**value, "_endpoint_dir": str(endpoint_dir(name)), "_source": str(path)}
            else:
                cfg.engine = {"workers": os.cpu_count() or 1, **value}
                if "container" in value:  # what the container mounts
                    cfg.engine.update(_endpoint_dir=str(endpoint_dir(name)), _source=str(path))
        else:
            setattr(cfg, key, value)
    return cfg


def _local_provider(engine: dict[str, Any]) -> bool:
    provider = engine.get("provider", "LocalProvider")
    return (provider.get("type") if isinstance(provider, dict) else provider) == "LocalProvider"


def write_default_config(name: str, engine: str = "process", workers: int | None = None) -> Path:
    """Write a commented config.yaml for a new endpoint."""
    if engine not in ENGINE_TYPES:
        raise ConfigError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINE_TYPES)}")
    d = endpoint_dir(name)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = d / "config.yaml"
    workers = workers or os.cpu_count() or 1
    if engine in PARSL_ENGINE_TYPES:
        path.write_text(_parsl_template(name, engine, workers))
        return path
    path.write_text(
        f"""# Tether endpoint {name!r}. Reference: docs/endpoint-admin.md
engine:
  type: {engine}          # thread | process
  workers: {workers}            # tasks that run at once
  # container: {{type: podman, image: NAME, options: []}}   # workers in an image (docs/endpoint-admin.md)
heartbeat_s: 5           # how often capacity and versions are reported to the service
retries_on_worker_loss: 0   # re-run a task whose worker process died under it
python_sandbox: false    # true: each Python function runs in tasks/<task id>/ (shell commands always do)
allowed_serialization_methods: [cloudpickle]
allowed_functions: null  # or a list of function ids this endpoint will run
kept_results_max_bytes: 21474836480   # results over 8 MiB stay here until released (docs/payloads.md); 0: none
"""
    )
    return path


def _parsl_template(name: str, engine: str, workers: int) -> str:
    """A starting config for the htex/mpi engines: one block on this host; the admin guide has Slurm and PBS."""
    if engine == "mpi":
        body = """engine:
  type: mpi               # Parsl MPIExecutor: tasks get PARSL_MPI_PREFIX for mpiexec/srun/aprun
  mpi_launcher: mpiexec   # mpiexec | srun | aprun
  max_workers_per_block: 1   # MPI tasks that run at once per block
  provider:
    type: LocalProvider   # any class in parsl.providers, with its keyword arguments
    init_blocks: 1
    max_blocks: 1
    launcher: {type: SimpleLauncher}   # the mpi engine needs SimpleLauncher
"""
    else:
        body = f"""engine:
  type: htex              # Parsl HighThroughputExecutor
  max_workers_per_node: {workers}
  provider:
    type: LocalProvider   # any class in parsl.providers (SlurmProvider, PBSProProvider, ...), with its arguments
    init_blocks: 1
    min_blocks: 0
    max_blocks: 1
"""
    return f"""# Tether endpoint {name!r}. Reference: docs/endpoint-admin.md
{body}heartbeat_s: 5
retries_on_worker_loss: 0
python_sandbox: false
allowed_serialization_methods: [cloudpickle]
allowed_functions: null
kept_results_max_bytes: 21474836480   # results over 8 MiB stay here until released (docs/payloads.md); 0: none
"""
