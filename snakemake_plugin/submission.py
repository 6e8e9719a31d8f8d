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
=============================  ==========================================================

``threads`` and ``mem_mb`` travel inside the job command: the remote Snakemake gives the rule
its ``{threads}`` (capped by the endpoint host's cores) and checks ``mem_mb`` as it does locally.
Every mistake is a :class:`WorkflowError` that names the rule and the resource.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from snakemake_interface_common.exceptions import WorkflowError

from tether.errors import InvalidResourceSpecification
from tether.resources import validate_resource_specification

#: Snakemake resource -> Tether resource specification key
MPI_RESOURCES = {"tasks": "num_ranks", "nodes": "num_nodes", "tasks_per_node": "ranks_per_node"}
ENDPOINT_RESOURCE = "tether_endpoint_id"
UEC_RESOURCE = "tether_user_endpoint_config"


@dataclass(frozen=True)
class Submission:
    """Everything the executor passes to ``tether.Executor.submit_task`` besides the command."""

    endpoint_id: str
    walltime: float | None
    resource_specification: dict[str, Any] | None
    user_endpoint_config: dict[str, Any] | None

    @property
    def mpi(self) -> bool:
        return bool(self.resource_specification)


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
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise WorkflowError(f"{where} is not valid JSON ({exc}): {value!r}") from None
    if not isinstance(value, dict):
        raise WorkflowError(f"{where} must be a JSON object such as '{{\"partition\": \"debug\"}}', not {value!r}")
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
    return Submission(str(endpoint), walltime, spec or None, uec)
