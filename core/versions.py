"""Can this side and an endpoint exchange pickled code? One comparison of installed versions,
for the client and every plugin.

An endpoint reports what it has installed in its heartbeats (``{"python": "3.11", "parsl":
"2025.1.1", ...}``; ``python`` is the minor version) and the service passes that on. What must
agree depends on what crosses: cloudpickled functions need the same Python minor version, Parsl's
app wrappers the same Parsl, Dask's task objects the same Dask, a Snakemake job command a
Snakemake of the same minor version. Each caller names its packages as :class:`Needed` and words
the :class:`Difference` s for its users; the comparison itself lives here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from .serialize import PY_VERSION


@dataclass(frozen=True)
class Needed:
    """A package both sides need.

    ``parts``: how many leading parts of the version must be equal (``None``: all of it; a
    difference past them is reported as not breaking). ``required``: an endpoint without it is a
    difference (otherwise it is not compared).
    """

    package: str
    parts: int | None = None
    required: bool = True


@dataclass(frozen=True)
class Difference:
    package: str
    here: str | None  #: None: not installed on this side
    there: str | None  #: None: not installed on the endpoint
    breaking: bool  #: False: the versions differ only past the parts that must agree


def installed(packages: Iterable[str]) -> dict[str, str]:
    """This side's versions in the heartbeat's format (``python``: the minor version); a package
    that is not installed is left out."""
    found = {}
    for package in packages:
        if package == "python":
            found[package] = PY_VERSION
            continue
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def differences(needed: Sequence[Needed], endpoint: Mapping[str, str],
                local: Mapping[str, str] | None = None) -> list[Difference]:
    """What differs between this side (``local``, by default what is installed here) and the
    endpoint's report, in the order of ``needed``."""
    local = installed(n.package for n in needed) if local is None else local
    found = []
    for need in needed:
        here, there = local.get(need.package), endpoint.get(need.package)
        if there is None:
            if need.required:
                found.append(Difference(need.package, here, None, True))
            continue
        if here is None or here == there:
            continue
        cut = slice(None) if need.parts is None else slice(need.parts)
        found.append(Difference(need.package, here, there, here.split(".")[cut] != there.split(".")[cut]))
    return found
