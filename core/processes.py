"""Signalling a process and waiting until it is gone: what ``tether service stop``,
``tether endpoint stop`` and the local stack's kill switches all need."""

from __future__ import annotations

import os
import time


def alive(pid: int) -> bool:
    """True while ``pid`` runs. A zombie child of ours still answers ``kill(0)``: it is reaped here."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == 0
    except ChildProcessError:  # not our child: kill(0) answered, so it runs
        return True


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
