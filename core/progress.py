"""Progress of a large transfer: a bar on a terminal, log lines otherwise (logger
``tether.transfer``, as the transfers' own lines)."""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

log = logging.getLogger("tether.transfer")

#: a transfer this large gets a progress display (a bar or log lines)
PROGRESS_MIN = 64 * 1024 * 1024
#: seconds between progress log lines when stderr is not a terminal
LOG_EVERY_S = 10.0


class _SharedBar:
    """One rich progress display per process (rich allows one live display at a time), shared by
    concurrent transfers and stopped when the last one ends."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.progress: Any = None
        self.users = 0

    def add(self, description: str, total: int) -> Any:
        with self.lock:
            if self.progress is None:
                from rich.console import Console
                from rich.progress import (
                    BarColumn,
                    DownloadColumn,
                    Progress,
                    TextColumn,
                    TimeRemainingColumn,
                    TransferSpeedColumn,
                )

                self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                         TransferSpeedColumn(), TimeRemainingColumn(),
                                         console=Console(stderr=True), transient=True)
                self.progress.start()
            self.users += 1
            return self.progress.add_task(description, total=total)

    def remove(self, task_id: Any) -> None:
        with self.lock:
            self.progress.remove_task(task_id)
            self.users -= 1
            if self.users == 0:
                self.progress.stop()
                self.progress = None


_bar = _SharedBar()


class TransferProgress:
    """Progress of one transfer, shown the way a mature command-line tool does it: a bar on
    stderr when stderr is a terminal, an INFO log line every ``LOG_EVERY_S`` otherwise.

    ``mode``: True (always a bar), False (nothing but a debug line), None (decide by the
    terminal and the size: transfers under ``PROGRESS_MIN`` stay quiet).
    """

    def __init__(self, description: str, total: int, mode: bool | None = None):
        self.description, self.total = description, total
        self.done = 0
        self.started = self._last_log = time.monotonic()
        quiet = mode is False or (mode is None and total < PROGRESS_MIN)
        self._bar_task = None
        self._log = not quiet and not (mode is True or sys.stderr.isatty())
        if not quiet and not self._log:
            self._bar_task = _bar.add(description, total)
        if self._log:
            log.info("%s: %.1f MiB to transfer", description, total / 2**20)

    def update(self, n: int) -> None:
        self.done += n
        if self._bar_task is not None:
            _bar.progress.update(self._bar_task, completed=self.done)
        elif self._log and time.monotonic() - self._last_log >= LOG_EVERY_S:
            self._last_log = now = time.monotonic()
            mib, total = self.done / 2**20, self.total / 2**20
            log.info("%s: %.0f%% (%.1f of %.1f MiB, %.1f MiB/s)", self.description, 100 * mib / max(1e-9, total),
                     mib, total, mib / max(1e-9, now - self.started))

    def close(self) -> None:
        elapsed = max(1e-9, time.monotonic() - self.started)
        if self._bar_task is not None:
            _bar.remove(self._bar_task)
            self._bar_task = None
        level = logging.INFO if self._log else logging.DEBUG
        log.log(level, "%s: %.1f MiB in %.1f s (%.1f MiB/s)", self.description, self.done / 2**20, elapsed,
                self.done / 2**20 / elapsed)
