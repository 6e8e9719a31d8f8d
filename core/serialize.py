"""Serialization of functions, arguments and results, with a header that says how and by what.

The header (``tether:1;method=cloudpickle;py=3.11\n``) lets the receiving side refuse a payload
it cannot trust or understand *in words*: a different Python minor version (pickled code objects
do not survive that) or a method the endpoint's administrator did not allow.
"""

from __future__ import annotations

import hashlib
import pickle
import sys
from typing import Any

import cloudpickle

from .errors import SerializationError, VersionMismatch

PY_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
DEFAULT_METHOD = "cloudpickle"
_MAGIC = b"tether:1;"
_HEADER = f"tether:1;method={DEFAULT_METHOD};py={PY_VERSION}\n".encode()


def serialize(obj: Any) -> bytes:
    """Serialize with cloudpickle (functions from ``__main__`` and notebooks travel by value)."""
    try:
        return _HEADER + cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise SerializationError(
            f"cannot serialize {type(obj).__name__}: {type(exc).__name__}: {exc}. "
            "Arguments and functions must be picklable by cloudpickle (no open files, locks or sockets)."
        ) from exc


def parse_header(data: bytes) -> tuple[dict[str, str], int]:
    """Return the header fields and the offset of the body."""
    if not data.startswith(_MAGIC):
        raise SerializationError("payload has no Tether header; it was not made by tether.serialize")
    end = data.find(b"\n", 0, 256)
    if end < 0:
        raise SerializationError("payload header is truncated")
    fields = dict(
        item.split("=", 1) for item in data[len(_MAGIC):end].decode().split(";") if "=" in item
    )
    return fields, end + 1


def deserialize(data: bytes, allowed_methods: frozenset[str] | None = None) -> Any:
    """Inverse of :func:`serialize`; refuses other Python versions and disallowed methods in words."""
    fields, offset = parse_header(data)
    method = fields.get("method", "?")
    if allowed_methods is not None and method not in allowed_methods:
        raise SerializationError(
            f"serialization method {method!r} is not allowed here (allowed: {', '.join(sorted(allowed_methods))})"
        )
    if method != DEFAULT_METHOD:
        raise SerializationError(f"unknown serialization method {method!r}")
    their_py = fields.get("py", "?")
    if their_py != PY_VERSION:
        raise VersionMismatch(
            f"payload was serialized by Python {their_py} but is being loaded by Python {PY_VERSION}; "
            "pickled functions do not survive a Python version change. Run the client and the endpoint "
            "with the same Python minor version."
        )
    try:
        return pickle.loads(memoryview(data)[offset:])
    except Exception as exc:
        raise SerializationError(f"cannot deserialize payload: {type(exc).__name__}: {exc}") from exc


def function_id(body: bytes) -> str:
    """Content hash of a serialized function: the same function registers once."""
    return hashlib.sha256(body).hexdigest()[:32]
