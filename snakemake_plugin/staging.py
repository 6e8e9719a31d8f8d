"""Files that travel with a job when the endpoint does not see the workflow directory.

Snakemake leaves this to an executor that says it can (``can_transfer_local_files``): with
``--shared-fs-usage none`` and no default storage provider, each job carries the workflow's
sources and the job's input files in its task's arguments, runs in its task's sandbox on the
endpoint, and brings its products (outputs, log and benchmark files) back in its result, which
the executor writes into the workflow directory before it reports the job done. The bytes take
Tether's own path (inline when small, through the service's blob store when large; see
:mod:`tether.files`): no storage server, no shared mount, and the endpoint's POSIX user needs no
access to the submitter's directories.

A group job brings back every member's products: Snakemake checks the files one member makes for
another too. Each job's task sandbox is its own, so a file one job makes travels back and then
out again with the next job that reads it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from snakemake_interface_common.exceptions import WorkflowError

from tether.files import FileContent, inside

#: Snakemake leaves sources larger than this out of its own source archive; so do we
MAX_SOURCE_BYTES = 10_000_000
#: sources travel with every job (not once per run, as Snakemake's archive does): above this, say so
SOURCES_WARN_BYTES = 1 << 20


@dataclass
class Staging:
    """What moved, for the summary at the end of a run."""

    sent_files: int = 0
    sent_bytes: int = 0
    received_files: int = 0
    received_bytes: int = 0
    _sources: list[str] | None = field(default=None, repr=False)

    def sources(self, workflow: Any, warn: Any) -> list[str]:
        """The workflow's source files, relative to the working directory (found once per run).

        Snakemake's private API, behind this one method: ``Workflow.dag.get_sources()`` (the
        list it archives for its own no-shared-FS path; checked with Snakemake 9.27)."""
        if self._sources is None:
            found = []
            for name in sorted(workflow.dag.get_sources()):
                if name.startswith("..") or os.path.isabs(name) or not os.path.isfile(name):
                    continue
                if os.path.getsize(name) > MAX_SOURCE_BYTES:
                    warn(f"Tether: the source file {name} is over {MAX_SOURCE_BYTES} bytes and is not sent; "
                         f"make it an input of the rules that need it")
                    continue
                found.append(name)
            total = sum(os.path.getsize(name) for name in found)
            if total > SOURCES_WARN_BYTES:
                warn(f"Tether: the workflow's sources ({len(found)} files, {_size(total)}, git-tracked files "
                     f"included, as Snakemake counts them) travel with every job; keep large files out of git "
                     f"or make them inputs of the rules that need them")
            self._sources = found
        return self._sources

    def files_for(self, what: str, names: Iterable[str]) -> dict[str, FileContent]:
        """The files to send: each name relative to the workflow directory, inside it."""
        files: dict[str, FileContent] = {}
        for name in names:
            name = os.path.normpath(str(name))
            if name in files:
                continue
            if os.path.isabs(name) or name.startswith(".."):
                raise WorkflowError(
                    f"{what}: the input {name} is outside the workflow directory, and without a shared file "
                    f"system only files inside it travel to the endpoint (or use a storage provider)")
            if os.path.isdir(name):
                for root, _, children in os.walk(name):
                    for child in children:
                        path = os.path.join(root, child)
                        files[path] = FileContent.read(path, f"{what}: input")
                continue
            files[name] = FileContent.read(name, f"{what}: input")
        self.sent_files += len(files)
        self.sent_bytes += sum(f.size for f in files.values())
        return files

    def write_back(self, products: Iterable[str], files: dict[str, FileContent], workdir: str) -> None:
        """Write what came back: only the products asked for (or files under a product
        directory), only inside ``workdir``; raise in words for anything else."""
        wanted = [os.path.normpath(str(p)) for p in products]
        for name, content in files.items():
            norm = os.path.normpath(name)
            if not any(norm == p or norm.startswith(p + os.sep) for p in wanted):
                raise WorkflowError(f"the endpoint sent back {name!r}, which the job does not make")
            self.received_files += 1
            self.received_bytes += content.size
            content.write(inside(workdir, norm))

    def summary(self) -> str | None:
        if not (self.sent_files or self.received_files):
            return None
        return (f"Tether: moved {self.sent_files} file(s), {_size(self.sent_bytes)}, to endpoints and "
                f"{self.received_files} file(s), {_size(self.received_bytes)}, back (no shared file system)")


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"  # not reached
