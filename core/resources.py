"""Resource specifications: the per-task resources an Executor asks for, validated in one place.

The keys are Parsl's (so a Parsl MPI app's ``parsl_resource_specification`` works unchanged):

``num_nodes``
    nodes the task spans (default 1);
``ranks_per_node``
    MPI ranks on each node;
``num_ranks``
    MPI ranks in all;
``launcher_options``
    extra text inserted after the launcher's own options (``"--bind-to core"``);
``priority``
    Parsl HighThroughputExecutor's task priority (lower runs first), passed through;
``environment``
    the environment the task runs in (see :mod:`tether.environment`): ``"match"`` or
    ``{"python": ..., "requirements": [...]}``, as ``Executor(environment=...)`` takes it (this
    key is how the plugins ask per task, e.g. a Parsl app's ``parsl_resource_specification``).

:func:`validate_resource_specification` is what the client runs at submit, so a mistake is an
:class:`~tether.errors.InvalidResourceSpecification` naming the key *before* anything is sent;
:func:`mpi_layout` is what the endpoint uses to fill in the keys a user left out.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from .environment import ENVIRONMENT_KEY, parse_environment
from .errors import InvalidResourceSpecification

MPI_KEYS = ("num_nodes", "ranks_per_node", "num_ranks", "launcher_options")
#: keys other engines accept and Tether passes through untouched
PASS_THROUGH_KEYS = ("priority",)
KNOWN_KEYS = MPI_KEYS + PASS_THROUGH_KEYS + (ENVIRONMENT_KEY,)

_INT_KEYS = ("num_nodes", "ranks_per_node", "num_ranks")


def _positive_int(key: str, value: Any) -> int:
    """An int >= 1; digit strings are accepted too (YAML/JSON sources often quote numbers)."""
    if isinstance(value, bool):
        raise InvalidResourceSpecification(
            f"resource_specification[{key!r}] must be a positive integer, not {value!r}"
        )
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or value < 1:
        raise InvalidResourceSpecification(
            f"resource_specification[{key!r}] must be a positive integer, not {value!r}"
        )
    return value


def validate_resource_specification(spec: Any) -> dict[str, Any]:
    """Check a resource specification; return a normalized copy (ints as ints).

    Raises :class:`InvalidResourceSpecification` for an unknown key (with the close matches),
    a value that is not a positive integer, or numbers that contradict each other.
    ``None`` and ``{}`` are valid (no particular resources).
    """
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise InvalidResourceSpecification(
            f"resource_specification must be a dict such as {{'num_ranks': 4}}, not {type(spec).__name__}"
        )
    unknown = [k for k in spec if k not in KNOWN_KEYS]
    if unknown:
        parts = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), KNOWN_KEYS, n=2)
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            parts.append(f"unknown key {key!r}{hint}")
        raise InvalidResourceSpecification(
            f"resource_specification: {'; '.join(parts)}. Known keys: {', '.join(KNOWN_KEYS)}"
        )
    out: dict[str, Any] = {}
    for key in _INT_KEYS:
        if key in spec and spec[key] is not None:
            out[key] = _positive_int(key, spec[key])
    if spec.get("launcher_options") is not None:
        opts = spec["launcher_options"]
        if not isinstance(opts, str):
            raise InvalidResourceSpecification(
                f"resource_specification['launcher_options'] must be a string of launcher flags, not {opts!r}"
            )
        out["launcher_options"] = opts
    if "priority" in spec:
        prio = spec["priority"]
        if isinstance(prio, bool) or not isinstance(prio, int | float):
            raise InvalidResourceSpecification(
                f"resource_specification['priority'] must be a number, not {prio!r}"
            )
        out["priority"] = prio
    wanted = spec.get(ENVIRONMENT_KEY)
    if wanted is not None:  # "match" is computed by the Executor, for the function it sends
        out[ENVIRONMENT_KEY] = "match" if wanted == "match" else parse_environment(wanted).as_data()
    if "num_ranks" in out or "ranks_per_node" in out:
        mpi_layout(out)  # contradictions are errors at submit, not at the endpoint
    return out


@dataclass(frozen=True)
class MPILayout:
    """How many ranks go where: all three numbers resolved."""

    num_nodes: int
    ranks_per_node: int
    num_ranks: int
    launcher_options: str = ""

    def as_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"num_nodes": self.num_nodes, "ranks_per_node": self.ranks_per_node,
                                "num_ranks": self.num_ranks}
        if self.launcher_options:
            spec["launcher_options"] = self.launcher_options
        return spec


def mpi_layout(spec: dict[str, Any]) -> MPILayout:
    """Resolve ``num_nodes``/``ranks_per_node``/``num_ranks`` from whichever of them are given.

    ``num_nodes`` defaults to 1; ``ranks_per_node`` defaults to the ranks spread evenly (rounded
    up); ``num_ranks`` defaults to ``num_nodes * ranks_per_node``. Given all three, the ranks must
    fit the nodes (``num_ranks <= num_nodes * ranks_per_node``) and use every node (more than
    ``(num_nodes - 1) * ranks_per_node``), which is what ``mpiexec -n N -ppn P`` can place.
    """
    nodes = spec.get("num_nodes") or 1
    per_node = spec.get("ranks_per_node")
    ranks = spec.get("num_ranks")
    if per_node is None and ranks is None:
        raise InvalidResourceSpecification(
            "resource_specification must say how many MPI ranks to start: give 'num_ranks' "
            "(and optionally 'num_nodes') or 'ranks_per_node', e.g. {'num_ranks': 4}"
        )
    if per_node is None:
        per_node = -(-ranks // nodes)
    if ranks is None:
        ranks = nodes * per_node
    if ranks > nodes * per_node:
        raise InvalidResourceSpecification(
            f"resource_specification: num_ranks={ranks} does not fit num_nodes={nodes} x "
            f"ranks_per_node={per_node} (= {nodes * per_node} ranks)"
        )
    if ranks <= (nodes - 1) * per_node:
        raise InvalidResourceSpecification(
            f"resource_specification: num_ranks={ranks} leaves nodes empty with num_nodes={nodes} x "
            f"ranks_per_node={per_node}; ask for fewer nodes or more ranks"
        )
    if ranks < nodes:
        raise InvalidResourceSpecification(
            f"resource_specification: num_ranks={ranks} is fewer than num_nodes={nodes}"
        )
    return MPILayout(nodes, per_node, ranks, spec.get("launcher_options") or "")


def check_mpi_specification(spec: Any) -> MPILayout:
    """Validate a specification meant for an MPI task (it must name a rank count)."""
    norm = validate_resource_specification(spec)
    if not any(k in norm for k in ("num_ranks", "ranks_per_node")):
        raise InvalidResourceSpecification(
            "an MPIFunction needs a resource_specification that says how many ranks to start, e.g. "
            "Executor(..., resource_specification={'num_ranks': 4}) or ex.resource_specification = "
            "{'num_nodes': 1, 'ranks_per_node': 4}"
        )
    return mpi_layout(norm)
