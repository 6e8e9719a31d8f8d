"""The environment a task asks to run in: a Python minor version and pinned requirements.

A function pickled on one Python minor version does not load on another, and a result built
with one release of a package may not load under another. So a client may ask the endpoint to
run a task in an environment it builds to match (``Executor(environment="match")``, or an
explicit ``{"python": "3.12", "requirements": ["numpy==1.26.4"]}``). The request travels with
the task inside its resource specification, under :data:`ENVIRONMENT_KEY`, so it follows the
path resource specifications already take (stored by the service as they are, read by the
endpoint as :class:`EnvironmentRequest`).

What "match" means is computed here, on the client: this Python's minor version, and the
installed distributions (at the versions installed here) that provide the modules the
function's code refers to: its globals that are modules or come from modules, the modules its
body imports, those of the functions and classes it closes over, recursively.
"""

from __future__ import annotations

import dis
import hashlib
import json
import re
import sys
import types
from collections.abc import Iterable
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, packages_distributions, requires, version
from typing import Annotated, Any

import cloudpickle
import msgspec
from msgspec import Meta, Struct

from .errors import InvalidEnvironment

#: the key of a resource specification that carries the environment request
ENVIRONMENT_KEY = "environment"

#: a requirement the endpoint's installer may take: a name, extras, version clauses. No URL, no
#: path, no option: those would reach past the index the endpoint's administrator allows.
REQUIREMENT_PATTERN = (r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?(\[[A-Za-z0-9._,-]+\])?"
                       r"(\s*(===|==|!=|~=|>=|<=|<|>)\s*[A-Za-z0-9.*+!_-]+(\s*,\s*(===|==|!=|~=|>=|<=|<|>)\s*"
                       r"[A-Za-z0-9.*+!_-]+)*)?$")
PYTHON_PATTERN = r"^3\.[0-9]{1,2}$"
MAX_REQUIREMENTS = 256

Requirement = Annotated[str, Meta(max_length=200, pattern=REQUIREMENT_PATTERN)]

#: distributions the endpoint installs itself in every environment (the worker needs them)
_ENDPOINT_OWN = frozenset({"tether"})


class EnvironmentRequest(Struct, frozen=True, forbid_unknown_fields=True):
    """What a task asks for: ``python`` (a minor version such as ``"3.12"``) and
    ``requirements`` (PEP 508 names with version clauses, such as ``"numpy==1.26.4"``)."""

    python: Annotated[str, Meta(pattern=PYTHON_PATTERN)]
    requirements: Annotated[list[Requirement], Meta(max_length=MAX_REQUIREMENTS)] = []

    def key(self) -> str:
        """The cache key: the same request, in any order of requirements, is one environment."""
        canon = json.dumps({"python": self.python, "requirements": sorted(set(self.requirements))})
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    def as_data(self) -> dict[str, Any]:
        """The request as it travels (plain data, inside the resource specification)."""
        return {"python": self.python, "requirements": sorted(set(self.requirements))}


def parse_environment(value: Any) -> EnvironmentRequest:
    """An :class:`EnvironmentRequest` from plain data, or :class:`InvalidEnvironment` saying
    what is wrong and what is expected."""
    if isinstance(value, EnvironmentRequest):
        return value
    if not isinstance(value, dict):
        raise InvalidEnvironment(
            f"environment must be 'match' or a dict such as {{'python': '3.12', 'requirements': "
            f"['numpy==1.26.4']}}, not {type(value).__name__}")
    try:
        return msgspec.convert(value, EnvironmentRequest)
    except msgspec.ValidationError as exc:
        raise InvalidEnvironment(
            f"environment {value!r}: {exc}. Give 'python' as a minor version ('3.12') and "
            "'requirements' as a list of names with versions ('numpy==1.26.4'); URLs, paths and "
            "installer options are not accepted") from None


def this_python() -> str:
    """This interpreter's minor version, as a request names it."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def match_environment(fn: Any) -> EnvironmentRequest:
    """The environment matching this client for ``fn``: this Python, and the installed
    distributions its code uses, pinned to the versions installed here."""
    return EnvironmentRequest(python=this_python(), requirements=requirements_for(imported_modules(fn)))


def requirements_for(modules: Iterable[str]) -> list[str]:
    """``name==version`` for each installed distribution providing one of the top-level
    ``modules`` (the standard library and Tether itself left out)."""
    providers = _providers()
    found: set[str] = set()
    for module in modules:
        if module.startswith("tether."):  # a plugin's code runs there: what its extra installed here
            found.update(_extra_requirements(module.split(".")[1]))
            continue
        if module in sys.stdlib_module_names:
            continue
        for dist in providers.get(module, ()):
            if dist.lower() in _ENDPOINT_OWN:
                continue
            try:
                found.add(f"{dist}=={version(dist)}")
            except PackageNotFoundError:
                continue
    return sorted(found)


#: the Tether subpackages whose code may be sent to run remotely, and the extra that installs what they need
_PLUGIN_EXTRAS = {"parsl": "parsl", "dask": "dask"}


@lru_cache(maxsize=8)
def _extra_requirements(subpackage: str) -> tuple[str, ...]:
    """What Tether's extra for ``tether.<subpackage>`` installed here, pinned to the installed
    versions (the Parsl plugin's app wrappers need Parsl and lazy-object-proxy where they run)."""
    extra = _PLUGIN_EXTRAS.get(subpackage)
    if extra is None:
        return ()
    try:
        declared = requires("tether") or []
    except PackageNotFoundError:
        return ()
    pins = []
    for line in declared:
        if f'extra == "{extra}"' not in line:
            continue
        head = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?", line)
        if head is None:
            continue
        try:
            pins.append(f"{head[1]}{head[2] or ''}=={version(head[1])}")
        except PackageNotFoundError:
            continue
    return tuple(pins)


@lru_cache(maxsize=1)
def _providers() -> dict[str, list[str]]:
    """Top-level module -> distributions (read once: it walks every installed distribution)."""
    return packages_distributions()


def imported_modules(fn: Any) -> set[str]:
    """Top-level names of the modules ``fn``'s code refers to (see the module's docstring)."""
    found: set[str] = set()
    _visit(fn, found, set())
    return found


def _top(name: str | None) -> str | None:
    return name.split(".", 1)[0] if name else None


def _by_value(obj: Any) -> bool:
    """Does cloudpickle send ``obj``'s code itself (then what the code uses matters), or a
    reference to its module? Its own answer where it has one (a private function, checked with
    cloudpickle 3.0-3.1); otherwise: functions of ``__main__`` and functions defined in functions."""
    decide = getattr(getattr(cloudpickle, "cloudpickle", None), "_should_pickle_by_reference", None)
    if decide is not None:
        try:
            return not decide(obj)
        except Exception:  # noqa: BLE001 - a cloudpickle that changed its mind: fall back
            pass
    return obj.__module__ in ("__main__", "__mp_main__") or "<locals>" in obj.__qualname__


def _add(found: set[str], module: str | None) -> None:
    top = _top(module)
    if top and top not in ("__main__", "builtins", "__mp_main__"):
        found.add(top)
    if module and module.startswith("tether."):  # a plugin: its extra's packages (see requirements_for)
        found.add(".".join(module.split(".")[:2]))


def _visit(obj: Any, found: set[str], seen: set[int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, types.ModuleType):
        _add(found, obj.__name__)
        return
    fn = getattr(obj, "__func__", obj)  # bound methods
    if isinstance(fn, type):
        _add(found, fn.__module__)
        if _by_value(fn):  # its methods' code travels: what they use matters
            for member in vars(fn).values():
                if isinstance(member, types.FunctionType | staticmethod | classmethod):
                    _visit(getattr(member, "__func__", member), found, seen)
        return
    if not isinstance(fn, types.FunctionType):
        module = getattr(obj, "__module__", None)  # a builtin, a callable instance, functools.partial
        if isinstance(module, str):
            _add(found, module)
        if hasattr(obj, "func"):  # functools.partial
            _visit(obj.func, found, seen)
        return
    _add(found, fn.__module__)
    if not _by_value(fn):
        return  # pickled by reference: its module's distribution is all it needs
    for cell in fn.__closure__ or ():
        try:
            _visit(cell.cell_contents, found, seen)
        except ValueError:  # an empty cell
            continue
    for name in _code_names(fn.__code__):
        if name in fn.__globals__:
            _visit(fn.__globals__[name], found, seen)
    for module in _code_imports(fn.__code__):
        _add(found, module)


def _code_objects(code: types.CodeType) -> Iterable[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _code_names(code: types.CodeType) -> set[str]:
    return {name for c in _code_objects(code) for name in c.co_names}


def _code_imports(code: types.CodeType) -> set[str]:
    """Modules imported inside the function's body (``import x`` / ``from x import y``)."""
    return {str(ins.argval) for c in _code_objects(code) for ins in dis.get_instructions(c)
            if ins.opname == "IMPORT_NAME" and ins.argval}

