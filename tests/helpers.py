"""Functions the tests run on the endpoint (shipped by value, see conftest)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def square(x: int) -> int:
    return x * x


def add(a: int, b: int = 0) -> int:
    return a + b


def fail_with(exc: BaseException) -> None:
    raise exc


class CustomError(Exception):
    """An exception type that only exists in the tests (travels by value)."""


def raise_custom(msg: str) -> None:
    raise CustomError(msg)


def sleep_then(seconds: float, value: object = None) -> object:
    time.sleep(seconds)
    return value


def touch_then_sleep(marker: str, seconds: float) -> str:
    """Record that the task started (and its pid and a child's pid), then sleep."""
    child = subprocess.Popen(["sleep", str(seconds + 60)])
    Path(marker).write_text(f"{os.getpid()} {child.pid}")
    time.sleep(seconds)
    return "finished"


def touch_then_wait(marker: str, go: str, data: bytes, timeout: float = 60.0) -> int:
    """Record that the task runs, then wait for ``go`` to exist; the length of ``data``."""
    Path(marker).write_text("running")
    deadline = time.monotonic() + timeout
    while not Path(go).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(data)


def touch(marker: str) -> str:
    Path(marker).write_text("ran")
    return "ran"


def task_env() -> dict:
    return {"task_id": os.environ.get("TETHER_TASK_ID"), "cwd": os.getcwd(), "pid": os.getpid()}


def write_in_sandbox(name: str) -> str:
    Path(name).write_text("kept")
    return str(Path(name).resolve())


def die_hard() -> None:
    os._exit(17)


def blob(n: int) -> bytes:
    return b"x" * n


def identity(x: object) -> object:
    return x


def who_am_i() -> dict:
    """What account a task runs as, and whether it could get root back."""
    import os

    umask = os.umask(0o077)
    os.umask(umask)
    try:
        os.setuid(0)
        regained = True
    except PermissionError:
        regained = False
    with open("/proc/self/status") as fh:
        no_new_privs = next((line.split()[1] for line in fh if line.startswith("NoNewPrivs:")), "?")
    return {"uid": os.getuid(), "gid": os.getgid(), "home": os.environ.get("HOME"), "umask": umask,
            "regained_root": regained, "no_new_privs": no_new_privs, "cwd": os.getcwd(),
            "secret_in_env": any("secret" in k.lower() for k in os.environ)}


def closure_over(data: bytes):  # noqa: ANN201 - returns a function that carries ``data``
    """A function whose pickled body is as large as ``data`` (a closure over it)."""

    def size_of_both(extra: bytes) -> int:
        return len(data) + len(extra)

    return size_of_both


def sha256_hex(data: bytes) -> str:
    """The hex sha256 of ``data``, computed where the task runs."""
    import hashlib

    return hashlib.sha256(data).hexdigest()


class RunsWhenLoaded:
    """An argument whose unpickling runs code (touches ``marker``): what an endpoint that takes
    only JSON arguments must never load, whatever path the argument takes."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (touch, (self.marker,))


def flood_stdout(n_bytes: int, last_line: str) -> int:
    """Print ``n_bytes`` of noise to the process's own stdout (fd 1), then ``last_line``."""
    chunk = b"flood " * 10922 + b"\n"
    written = 0
    while written < n_bytes:
        written += os.write(1, chunk)
    os.write(1, last_line.encode() + b"\n")
    return written
