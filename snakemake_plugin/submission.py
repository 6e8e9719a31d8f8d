"""What a Snakemake job asks of Tether: its endpoint, walltime and MPI ranks, read from its resources.

Snakemake's names map onto Tether's as a Snakemake user expects (the slurm plugin's meaning):

=============================  ==========================================================
Snakemake resource             Tether
=============================  ==========================================================
``runtime`` (minutes)          walltime: the job's processes are killed when it is exceeded
``tasks``                      ``num_ranks``  (MPI ranks)
``nodes``                      ``num_nodes``
``tasks_per_node``             ``ranks_per_node``
``mpi``                        the launcher the rule's command names (``{resources.mpi}``)
``tether_endpoint_id``         the endpoint this rule's jobs run on (default: the setting)
``tether_user_endpoint_config`` a JSON object for a multi-user endpoint's config template
``tether_environment``         the environment the job runs in: ``"match"`` or a JSON object
=============================  ==========================================================

``threads`` and ``mem_mb`` travel inside the job command: the remote Snakemake gives the rule
its ``{threads}`` (capped by the endpoint host's cores) and checks ``mem_mb`` as it does locally.
Every mistake is a :class:`WorkflowError` that names the rule and the resource.

``tether_environment`` asks the endpoint to run the job in an environment it builds (see
``docs/environments.md``). The job runs ``python -m snakemake`` there, and its function is pickled
here, so the environment always has this client's Python and this Snakemake: ``"match"`` asks for
just that, and a JSON object (``'{"requirements": ["numpy==1.26.4"]}'``) for that plus its
requirements (``"python"`` may be left out; another Python than this one is refused, since the job's
function would not load there).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from snakemake_interface_common.exceptions import WorkflowError

from tether.environment import ENVIRONMENT_KEY, EnvironmentRequest, parse_environment, this_python
from tether.errors import InvalidEnvironment, InvalidResourceSpecification
from tether.resources import MPI_KEYS, validate_resource_specification

#: Snakemake resource -> Tether resource specification key
MPI_RESOURCES = {"tasks": "num_ranks", "nodes": "num_nodes", "tasks_per_node": "ranks_per_node"}
ENDPOINT_RESOURCE = "tether_endpoint_id"
UEC_RESOURCE = "tether_user_endpoint_config"
ENVIRONMENT_RESOURCE = "tether_environment"


@dataclass(frozen=True)
class Submission:
    """Everything the executor passes to ``tether.Executor.submit_task`` besides the command."""

    endpoint_id: str
    walltime: float | None
    resource_specification: dict[str, Any] | None
    user_endpoint_config: dict[str, Any] | None

    @property
    def mpi(self) -> bool:
        return any(key in MPI_KEYS for key in self.resource_specification or {})


def _positive_int(what: str, name: str, value: Any, meaning: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise WorkflowError(f"{what}: resources {name}={value!r} must be a positive integer ({meaning})")
    return value


def parse_user_endpoint_config(value: Any, where: str) -> dict[str, Any] | None:
    """A user endpoint config given as a JSON object (text) or a dict; ``None``/empty for none."""
    if value in (None, ""):
        return None
    return _json_object(value, where, '{"partition": "debug"}')


def _json_object(value: Any, where: str, example: str) -> dict[str, Any]:
    """A JSON object given as text or a dict, or a :class:`WorkflowError` showing ``example``."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise WorkflowError(f"{where} is not valid JSON ({exc}): {value!r}") from None
    if not isinstance(value, dict):
        raise WorkflowError(f"{where} must be a JSON object such as '{example}', not {value!r}")
    return value


def submission_for(what: str, resources: Mapping[str, Any], default_endpoint: str | None,
                   default_uec: dict[str, Any] | None) -> Submission:
    """Read a job's resources (``what`` names the rule or group in messages)."""
    endpoint = resources.get(ENDPOINT_RESOURCE) or default_endpoint
    if not endpoint:
        raise WorkflowError(
            f"{what} has no Tether endpoint: pass --tether-endpoint-id ID (or set "
            f"SNAKEMAKE_TETHER_ENDPOINT_ID), or give the rule resources: {ENDPOINT_RESOURCE}=\"ID\""
        )
    uec = default_uec
    if resources.get(UEC_RESOURCE):
        uec = parse_user_endpoint_config(resources[UEC_RESOURCE], f"{what}: resources {UEC_RESOURCE}")

    walltime = None
    runtime = resources.get("runtime")
    if runtime is not None:
        minutes = runtime
        if isinstance(minutes, str):
            try:
                minutes = float(minutes)
            except ValueError:
                minutes = None
        if isinstance(minutes, bool) or not isinstance(minutes, int | float) or minutes <= 0:
            raise WorkflowError(f"{what}: resources runtime={runtime!r} must be a positive number of minutes "
                                f"(or a duration such as '90m' or '2h')")
        walltime = float(minutes) * 60

    spec: dict[str, Any] = {}
    for name, key in MPI_RESOURCES.items():
        if resources.get(name) is not None:
            meaning = {"tasks": "the number of MPI ranks", "nodes": "the number of nodes",
                       "tasks_per_node": "MPI ranks on each node"}[name]
            spec[key] = _positive_int(what, name, resources[name], meaning)
    if spec:
        try:
            spec = validate_resource_specification(spec)
        except InvalidResourceSpecification as exc:
            given = ", ".join(f"{n}={resources[n]}" for n in MPI_RESOURCES if resources.get(n) is not None)
            raise WorkflowError(f"{what}: resources {given} cannot be satisfied: {exc}") from None
    if resources.get(ENVIRONMENT_RESOURCE):
        spec[ENVIRONMENT_KEY] = job_environment(what, resources[ENVIRONMENT_RESOURCE]).as_data()
    return Submission(str(endpoint), walltime, spec or None, uec)


def job_environment(what: str, value: Any) -> EnvironmentRequest:
    """The environment a ``tether_environment`` resource asks for, with this Python and this
    Snakemake (see the module's docstring)."""
    where = f"{what}: resources {ENVIRONMENT_RESOURCE} ('match' or a JSON object)"
    value = {} if value == "match" else _json_object(value, where, '{"requirements": ["numpy==1.26.4"]}')
    python = value.get("python", this_python())
    if python != this_python():
        raise WorkflowError(f"{where} asks for Python {python}, but this Snakemake runs on Python {this_python()} "
                            f"and the job's function is pickled here: leave 'python' out (this one is used)")
    try:
        request = parse_environment({**value, "python": python})
        named = {canonicalize_name(Requirement(r).name) for r in request.requirements}
    except (InvalidEnvironment, InvalidRequirement) as exc:
        raise WorkflowError(f"{where}: {exc}") from None
    if "snakemake" in named:
        return request
    return EnvironmentRequest(python=python, requirements=[*request.requirements, f"snakemake=={version('snakemake')}"])
