"""Serialization of functions, arguments and results, with a header that says how and by what.

The header (``tether:1;method=cloudpickle;py=3.11\n``) lets the receiving side refuse a payload
it cannot trust or understand *in words*: a different Python minor version (pickled code objects
do not survive that) or a method the endpoint's administrator did not allow.

Two methods: ``cloudpickle`` (anything, including code: loading it runs code) and ``json``
(plain data only: loading it runs nothing). An endpoint that accepts only registered functions
on ``json`` arguments never unpickles anything a submitter shaped.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import sys
from collections.abc import Callable
from typing import Any

import cloudpickle

from .errors import MethodNotAllowed, SerializationError, VersionMismatch

PY_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
DEFAULT_METHOD = "cloudpickle"
_MAGIC = b"tether:1;"
_HEADER = f"tether:1;method={DEFAULT_METHOD};py={PY_VERSION}\n".encode()
_JSON_HEADER = f"tether:1;method=json;py={PY_VERSION}\n".encode()
#: what a serialization error names: what the client sends, and what a task returns
ARGUMENTS = "Arguments and functions"
RESULT = "A task's return value"
#: methods a client may choose for arguments (functions are always cloudpickle)
DATA_METHODS = ("cloudpickle", "json")


def serialize(obj: Any, method: str = DEFAULT_METHOD, what: str = ARGUMENTS) -> bytes:
    """Serialize with cloudpickle (functions from ``__main__`` and notebooks travel by value),
    or with ``method="json"`` for plain data (lists, dicts, str, numbers, bool, None).
    ``what`` names the value in an error (arguments and functions, or a task's result)."""
    if method == "json":
        try:
            return _JSON_HEADER + json.dumps(obj, allow_nan=False, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            raise SerializationError(
                f"cannot serialize as JSON: {exc}. With data_serializer='json' arguments must be plain data "
                "(lists, dicts, strings, numbers, booleans, None); use the default 'cloudpickle' for other objects."
            ) from None
    if method != DEFAULT_METHOD:
        raise SerializationError(f"unknown serialization method {method!r}; choose one of {', '.join(DATA_METHODS)}")
    try:
        return _HEADER + cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise unpicklable(obj, exc, what) from exc


def serialize_into(obj: Any, out: Any, method: str = DEFAULT_METHOD, what: str = ARGUMENTS) -> None:
    """:func:`serialize` into a writable binary file object, so a large value is written out as it
    is pickled instead of being held a second time, as bytes, in memory."""
    if method == "json":
        out.write(serialize(obj, method))
        return
    if method != DEFAULT_METHOD:
        raise SerializationError(f"unknown serialization method {method!r}; choose one of {', '.join(DATA_METHODS)}")
    out.write(_HEADER)
    try:
        cloudpickle.dump(obj, out, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise unpicklable(obj, exc, what) from exc


def unpicklable(obj: Any, exc: BaseException, what: str) -> SerializationError:
    """The error for a value cloudpickle refused: which value, why, and what is allowed."""
    return SerializationError(f"cannot serialize {type(obj).__name__}: {type(exc).__name__}: {exc}. {what} must be "
                              "picklable by cloudpickle (no open files, locks, sockets or generators).")


#: headers already parsed (a process sees a handful: one per method and Python version)
_parsed_headers: dict[bytes, dict[str, str]] = {}


def parse_header(data: Any) -> tuple[dict[str, str], int]:
    """Return the header fields and the offset of the body (``data``: bytes, or any buffer such
    as a memory-mapped file). The fields are shared: read them, never change them."""
    head = bytes(data[:256])
    if not head.startswith(_MAGIC):
        raise SerializationError("payload has no Tether header; it was not made by tether.serialize")
    end = head.find(b"\n", 0, 256)
    if end < 0:
        raise SerializationError("payload header is truncated")
    line = head[:end]
    fields = _parsed_headers.get(line)
    if fields is None:
        fields = dict(item.split("=", 1) for item in line[len(_MAGIC):].decode().split(";") if "=" in item)
        if len(_parsed_headers) < 64:  # made-up headers cannot grow it
            _parsed_headers[line] = fields
    return fields, end + 1


def _check_method(fields: dict[str, str], allowed_methods: frozenset[str] | None) -> str:
    """The payload's method, if this side allows it and can load it (else the error in words)."""
    method = fields.get("method", "?")
    if allowed_methods is not None and method not in allowed_methods:
        raise MethodNotAllowed(
            f"serialization method {method!r} is not allowed here (allowed: {', '.join(sorted(allowed_methods))})",
            method)
    if method not in ("json", DEFAULT_METHOD):
        raise SerializationError(f"unknown serialization method {method!r}")
    if method == DEFAULT_METHOD:
        their_py = fields.get("py", "?")
        if their_py != PY_VERSION:
            raise VersionMismatch(
                f"payload was serialized by Python {their_py} but is being loaded by Python {PY_VERSION}; "
                "pickled functions do not survive a Python version change. Run the client and the endpoint "
                "with the same Python minor version."
            )
    return method


def deserialize(data: Any, allowed_methods: frozenset[str] | None = None) -> Any:
    """Inverse of :func:`serialize`; refuses other Python versions and disallowed methods in words."""
    fields, offset = parse_header(data)
    body = memoryview(data)[offset:]
    return _decode(_check_method(fields, allowed_methods), body.tobytes, lambda: pickle.loads(body))


def deserialize_from(fh: io.BufferedReader, allowed_methods: frozenset[str] | None = None) -> Any:
    """:func:`deserialize` reading from a buffered binary file (a file on disk, a download) at
    the payload's start. Pickle reads a large body (bytes, an array's buffer) straight into the
    object it makes with ``readinto``: the bytes are copied once, from the page cache or the
    socket, where unpickling a mapped file copies them out of the map (twice the memory traffic
    on a gibibyte). An OSError is the file's or the download's, not the payload's: it is raised
    as it is, so the caller may read again."""
    fields, offset = parse_header(fh.peek(256)[:256])
    method = _check_method(fields, allowed_methods)
    fh.read(offset)
    return _decode(method, fh.read, lambda: pickle.load(fh), passed_on=(OSError,))


def _decode(method: str, json_text: Callable[[], bytes], unpickle: Callable[[], Any],
            passed_on: tuple[type[BaseException], ...] = ()) -> Any:
    """The body of a payload whose header was checked, by ``method``; what fails to decode is a
    SerializationError that says why (``passed_on`` errors excepted)."""
    if method == "json":
        try:
            return json.loads(json_text())
        except ValueError as exc:
            raise SerializationError(f"cannot deserialize JSON payload: {exc}") from None
    try:
        return unpickle()
    except passed_on:
        raise
    except Exception as exc:
        raise SerializationError(f"cannot deserialize payload: {type(exc).__name__}: {exc}") from exc


def method_of(data: bytes) -> str:
    """The serialization method a payload's header names (SerializationError if it has none)."""
    return parse_header(data)[0].get("method", "?")


def function_id(body: bytes) -> str:
    """Content hash of a serialized function: the same function registers once."""
    return hashlib.sha256(body).hexdigest()[:32]
