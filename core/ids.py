"""What an identifier may look like, checked where it enters and again where it becomes a path.

Task ids, group ids, endpoint ids and endpoint names end up as file and directory names on the
endpoint (sandboxes, Parsl control files, ``~/.tether/endpoints/NAME``). One definition here,
imported by the client, the service, the endpoint and the CLI, keeps a peer from smuggling
``../../x`` into any of them.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from .errors import TetherError

#: task, group and endpoint ids: a letter or digit first (so never "." or ".."), then letters,
#: digits, "_", "-" or "." ; no "/" ; at most 64 characters (the store's column width)
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: function ids are content hashes (see tether.serialize.function_id)
FUNCTION_ID_PATTERN = r"^[0-9a-f]{32}$"
#: endpoint names: the same alphabet as ids, a little longer
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"

_ID = re.compile(ID_PATTERN)
_FUNCTION_ID = re.compile(FUNCTION_ID_PATTERN)
_NAME = re.compile(NAME_PATTERN)


class InvalidIdentifier(TetherError, ValueError):
    """An id or a name that Tether refuses (it could escape a directory, or is malformed)."""


def _check(regex: re.Pattern[str], value: object, kind: str, rule: str) -> str:
    if not isinstance(value, str) or not regex.fullmatch(value):
        raise InvalidIdentifier(f"invalid {kind} {value!r}: {rule}")
    return value


def check_id(value: object, kind: str = "id") -> str:
    """``value`` if it is a valid task, group or endpoint id; InvalidIdentifier otherwise."""
    return _check(_ID, value, kind, "use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit")


def check_function_id(value: object) -> str:
    return _check(_FUNCTION_ID, value, "function id", "a function id is 32 lowercase hex digits (a content hash)")


def check_name(value: object, kind: str = "endpoint name") -> str:
    return _check(_NAME, value, kind, "use 1-128 letters, digits, '_', '-' or '.', starting with a letter or digit")


def child_path(root: Path, name: str, kind: str = "id",
               check: Callable[[object, str], str] = check_id) -> Path:
    """``root / name``, refused unless ``name`` is valid and the result stays inside ``root``.

    ``check`` is the rule ``name`` must follow: :func:`check_id` for ids, :func:`check_name` for
    endpoint names (which may be longer). The second check is belt and braces: both patterns
    already exclude separators and dot-names.
    """
    check(name, kind)
    path = root / name
    if path.parent != root or name in (".", ".."):
        raise InvalidIdentifier(f"invalid {kind} {name!r}: it would leave {root}")
    return path


def new_task_id() -> str:
    """A fresh task id: a time-ordered UUID (version 7 layout, RFC 9562): 48 bits of Unix
    milliseconds, then 74 random bits.

    Ids of tasks submitted together sort together, so the service's stores (B-trees keyed by
    id) append them instead of scattering a batch across the whole index: inserting a
    million-task backlog into SQLite costs half the CPU it did with random (version 4) ids,
    and the gap grows with the table. 74 random bits keep ids unguessable enough and collisions
    out of reach (ids are checked per owner by the service anyway).
    """
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = ((ms & (1 << 48) - 1) << 80 | 0x7 << 76 | (rand >> 62 & 0xFFF) << 64
             | 0b10 << 62 | rand & (1 << 62) - 1)
    h = f"{value:032x}"  # what str(uuid.UUID(int=value)) gives, without building the object
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
