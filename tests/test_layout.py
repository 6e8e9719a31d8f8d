"""The walls of the layout (README's table, docs/architecture.md) hold in the imports:
dependencies point one way, plugins -> core <- endpoint, service -> core, and no module imports
itself back through others. Read from the source with ``ast`` (imports inside functions count:
a lazy import is still an arrow)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: folder -> the package it installs as (pyproject's package-dir)
ROOMS = {"core": "tether", "service": "tether.service", "endpoint": "tether.endpoint", "parsl_plugin": "tether.parsl",
         "dask_plugin": "tether.dask", "snakemake_plugin": "snakemake_executor_plugin_tether"}
#: what each room may import of the others
MAY_IMPORT = {
    "core": set(),
    "service": {"core"},
    "endpoint": {"core"},
    "parsl_plugin": {"core"},
    "dask_plugin": {"core"},
    "snakemake_plugin": {"core"},
}
#: the ``tether`` command mounts the commands the service and the endpoint define for themselves
MOUNTS = {"core/cli.py": {"tether.service.cli", "tether.endpoint.cli", "tether.service.cli.service_app",
                          "tether.endpoint.cli.endpoint_app"}}


def _module_of(path: Path) -> str:
    room = path.relative_to(ROOT).parts[0]
    parts = list(path.relative_to(ROOT / room).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([ROOMS[room], *parts])


def _room_of(module: str) -> str | None:
    matches = [room for room, package in ROOMS.items() if module == package or module.startswith(package + ".")]
    return max(matches, key=lambda room: len(ROOMS[room]), default=None)  # the most specific package


def _imports(path: Path) -> set[str]:
    """Modules a file imports (relative imports resolved), inside functions too."""
    own = _module_of(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # "from . import x": a module
    return found


def _sources() -> dict[str, Path]:
    files = {}
    for room in ROOMS:
        for path in (ROOT / room).rglob("*.py"):
            if "migrations" not in path.parts and "_build" not in path.parts:
                files[_module_of(path)] = path
    return files


def test_dependencies_point_one_way() -> None:
    wrong = []
    for path in _sources().values():
        room = path.relative_to(ROOT).parts[0]
        allowed = MAY_IMPORT[room] | {room}
        mounts = MOUNTS.get(str(path.relative_to(ROOT)), set())
        for target in _imports(path):
            other = _room_of(target)
            if other is not None and other not in allowed and target not in mounts:
                wrong.append(f"{path.relative_to(ROOT)} imports {target} ({other}/)")
    assert not wrong, "imports against the layout:\n" + "\n".join(sorted(set(wrong)))


def test_no_import_cycles() -> None:
    sources = _sources()
    graph = {m: {t for t in _imports(p) if t in sources and t != m} for m, p in sources.items()}
    # a package's __init__ re-exporting its modules is no cycle of ideas: leave packages out
    packages = {m for m, p in sources.items() if p.name == "__init__.py"}
    graph = {m: targets - packages for m, targets in graph.items() if m not in packages}
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycles.append(" -> ".join([*stack[stack.index(t):], t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_every_package_folder_is_installed() -> None:
    """pyproject lists the packages explicitly: a new folder left out of the list works in an
    editable install and is missing from a wheel (the service then fails to start)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {_module_of(init) for room in ROOMS for init in (ROOT / room).rglob("__init__.py")
               if "_build" not in init.parts and "__pycache__" not in init.parts}
    assert folders <= listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(folders - listed)}"
