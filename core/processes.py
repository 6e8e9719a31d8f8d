"""Signalling a process and waiting until it is gone, and telling whether a pid read from a
file is still the process that wrote it: what ``tether service stop``, ``tether endpoint stop``
and the local stack's kill switches all need."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from fnmatch import fnmatchcase


def alive(pid: int) -> bool:
    """True while ``pid`` runs. A zombie still answers ``kill(0)``: a child of ours is reaped here;
    another's counts as gone (its parent may never reap it: PID 1 in many containers does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == 0
    except ChildProcessError:  # not our child: kill(0) answered, so it runs, unless it is a zombie
        return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return False  # no procfs: trust kill(0)
    return stat[stat.rfind(b")") + 2:][:1] == b"Z"


def signal_and_wait(pid: int, sig: int, timeout: float) -> bool:
    """Send ``sig`` and wait up to ``timeout`` seconds for the process to exit; True if it did."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.02)
    return not alive(pid)


# --- is a recorded pid still the process that recorded it? ------------------------------------
#: how much later than its pid file a process may seem to have started (clock granularity:
#: the kernel's boot time is whole seconds) and still be the process that wrote the file
_START_SLACK_S = 1.0


def process_command(pid: int) -> list[str] | None:
    """The argument vector of a live process, or None (gone, a zombie, or not ours to read)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        if os.path.isdir("/proc"):
            return None
        return _psutil_command(pid)  # no procfs (macOS, BSD)
    except OSError:
        return None
    if not raw:  # a zombie (or a kernel thread) has an empty command line
        return None
    return [arg.decode(errors="replace") for arg in raw.rstrip(b"\0").split(b"\0")]


def process_start_time(pid: int) -> float | None:
    """When a process started, in seconds since the epoch (field 22 of /proc/PID/stat), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
        with open("/proc/stat", "rb") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith(b"btime "))
    except FileNotFoundError:
        if os.path.isdir("/proc"):
            return None
        return _psutil_start_time(pid)
    except (OSError, StopIteration, ValueError):
        return None
    fields = stat[stat.rfind(b")") + 2:].split()  # after "pid (comm) ": field 3 (state) is fields[0]
    try:
        ticks = int(fields[19])  # field 22: start time in clock ticks after boot
    except (IndexError, ValueError):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _psutil_command(pid: int) -> list[str] | None:
    try:
        import psutil

        return psutil.Process(pid).cmdline() or None
    except Exception:  # noqa: BLE001 - not installed, gone, denied: unverifiable
        return None


def _psutil_start_time(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001
        return None


def _runs(argv: list[str], command: Sequence[str]) -> bool:
    n = len(command)
    return any(
        all(fnmatchcase(arg, pattern) for arg, pattern in zip(argv[i:i + n], command, strict=True))
        for i in range(len(argv) - n + 1)
    )


def is_recorded_process(pid: int, commands: Sequence[Sequence[str]], recorded_at: float | None = None) -> bool:
    """True only if ``pid`` still is the process that a pid file (written at ``recorded_at``) names.

    A pid file outlives its process (SIGKILL, a crash, a reboot) and the kernel hands the pid to
    the next process that starts: signalling it blindly could kill anything the user runs. So a
    recorded pid counts only if the process now behind it

    - runs one of ``commands``: its argument vector holds the arguments of one of them in a row
      (each item an ``fnmatch`` pattern, e.g. ``("tether.endpoint.run", "NAME")`` or
      ``("*tether", "endpoint", "start", "NAME")``), and
    - started no later than ``recorded_at`` (the pid file's mtime; the process writes its own
      pid, so a process that started after the file was written cannot be its writer).

    Anything unreadable counts as "not that process": never signal what cannot be verified.
    """
    argv = process_command(pid)
    if argv is None or not any(_runs(argv, command) for command in commands):
        return False
    if recorded_at is not None:
        started = process_start_time(pid)
        if started is None or started > recorded_at + _START_SLACK_S:
            return False
    return True


#: how a Tether service runs: detached (``python -m tether.service.server``), or in the foreground
#: of ``tether service start`` (the console script or ``python -m tether.cli``)
SERVICE_COMMANDS: tuple[tuple[str, ...], ...] = (
    ("tether.service.server",),
    ("tether.cli", "service", "start"),
    ("*tether", "service", "start"),
)


def endpoint_commands(name: str) -> tuple[tuple[str, ...], ...]:
    """How the daemon of endpoint ``name`` runs: detached (``python -m tether.endpoint.run NAME``;
    ``tether.endpoint.daemon`` before 2026-12, so a daemon an older release started is still
    recognised) or in the foreground of ``tether endpoint start NAME``. ``name`` must be a valid
    endpoint name (:func:`tether.ids.check_name`), which has no ``fnmatch`` wildcards."""
    return (
        ("tether.endpoint.run", name),
        ("tether.endpoint.daemon", name),
        ("tether.cli", "endpoint", "start", name),
        ("*tether", "endpoint", "start", name),
    )
