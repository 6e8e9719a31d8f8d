"""Remote tracebacks that point at the user's own files.

cloudpickle sends the code of functions defined in a script or notebook by value and, to keep
its bytes deterministic, replaces each code object's file name with ``<dynamic-code>``; the
line numbers and function names survive. So a traceback from the endpoint says
``File "<dynamic-code>", line 9, in keyerr`` where the user wrote the function. The client
still has that code: this module finds it where cloudpickle took it from by value (``__main__``
and the modules registered with ``cloudpickle.register_pickle_by_value``: their functions, the
methods of their classes, and what those define inside), puts the real file name back and adds
the source line, as a local traceback would show it.
"""

from __future__ import annotations

import linecache
import re
import sys
import types
from collections.abc import Iterator
from typing import Any

_DYNAMIC = re.compile(r'^(?P<indent>\s*)File "<dynamic-code>", line (?P<line>\d+), in (?P<name>.+)$')


def localize(text: str) -> str:
    """``text`` with each ``<dynamic-code>`` frame named by the file (and source line) of the
    function sent by value with that name and line; frames with no match are left as they are."""
    if "<dynamic-code>" not in text:
        return text
    codes: dict[str, list[types.CodeType]] = {}
    for namespace in _by_value_namespaces():
        for code in _codes_in(namespace):
            codes.setdefault(code.co_name, []).append(code)
    out: list[str] = []
    for line in text.splitlines():
        match = _DYNAMIC.match(line)
        code = _find(codes, match["name"], int(match["line"])) if match else None
        if match is None or code is None:
            out.append(line)
            continue
        indent, number = match["indent"], int(match["line"])
        out.append(f'{indent}File "{code.co_filename}", line {number}, in {match["name"]}')
        source = linecache.getline(code.co_filename, number).strip()
        if source:
            out.append(f"{indent}  {source}")
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def _by_value_namespaces() -> list[dict[str, Any]]:
    import cloudpickle

    names = ["__main__", *sorted(cloudpickle.list_registry_pickle_by_value())]
    return [vars(sys.modules[name]) for name in names if name in sys.modules]


def _find(codes: dict[str, list[types.CodeType]], name: str, line: int) -> types.CodeType | None:
    for code in codes.get(name, ()):
        if any(number == line for _, _, number in code.co_lines()):
            return code
    return None


def _codes_in(namespace: dict[str, Any]) -> Iterator[types.CodeType]:
    """Code objects of the functions (and classes' methods) in a namespace, nested ones too."""
    seen: set[int] = set()
    for value in list(namespace.values()):
        candidates = [value]
        if isinstance(value, type):
            candidates = list(vars(value).values())
        for candidate in candidates:
            func = getattr(candidate, "__func__", candidate)  # staticmethod, classmethod
            code = getattr(func, "__code__", None)
            if isinstance(code, types.CodeType):
                yield from _nested(code, seen)


def _nested(code: types.CodeType, seen: set[int]) -> Iterator[types.CodeType]:
    if id(code) in seen:
        return
    seen.add(id(code))
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _nested(const, seen)


__all__ = ["localize"]
