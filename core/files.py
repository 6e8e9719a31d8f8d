"""A file's bytes as part of a task's arguments or result, for submitters and endpoints that share
no file system.

The plugins move files this way (the Parsl plugin's ``TetherFileStaging``; the Snakemake plugin
can use the same pieces): the bytes ride in the task's arguments to the endpoint and in its
result back, so they take Tether's own path — inline in a frame when small, a blob streamed
through the service's disk when large (see ``docs/payloads.md``) — with no second transfer
channel, no credentials of their own, and no need for the endpoint's POSIX user to read the
submitter's directories (a multi-user endpoint runs tasks as another user).

A :class:`FileContent` is pickled straight from a read-only memory map of the file, so on the
sending side the bytes are never copied into the process's memory (the pickler writes them from
the map into the spill file); the receiving side holds them once, as ``bytes``, until they are
written out. Nothing here imports Parsl.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import pickle
import secrets
import shutil
import stat
from typing import Any

#: where files whose submit-side path is absolute (or climbs out with ``..``) go in a task's directory
ELSEWHERE = "_tether_files"


class FileContent:
    """The bytes of one file (and whether it was executable), picklable from a memory map.

    Built on the sending side with :meth:`read`, which maps the file at once (so the file may be
    removed afterwards, as the endpoint does with a task's directory); unpickled on the other
    side as plain ``bytes``.
    """

    __slots__ = ("data", "executable")

    def __init__(self, data: bytes | mmap.mmap, executable: bool = False):
        self.data: bytes | mmap.mmap | None = data
        self.executable = executable

    @classmethod
    def read(cls, path: str, what: str = "file") -> FileContent:
        """Map ``path``; a missing or unreadable file, or a directory, is an error in words."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise FileNotFoundError(f"{what} ({path}) does not exist") from None
        except PermissionError:
            raise PermissionError(f"{what} ({path}) cannot be read: permission denied") from None
        except IsADirectoryError:
            raise IsADirectoryError(f"{what} ({path}) is a directory; only files are moved") from None
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError(f"{what} ({path}) is a directory; only files are moved")
            executable = bool(info.st_mode & 0o111)
            if info.st_size == 0:  # an empty file cannot be mapped
                return cls(b"", executable)
            return cls(mmap.mmap(fd, 0, access=mmap.ACCESS_READ), executable)
        finally:
            os.close(fd)

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else 0

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        data = self.data
        if isinstance(data, mmap.mmap):
            # protocol 5 writes the buffer in band, straight from the map: no copy in memory
            data = pickle.PickleBuffer(data) if isinstance(protocol, int) and protocol >= 5 else data[:]
        return (FileContent, (data, self.executable))

    def write(self, path: str, *, append: bool = False) -> None:
        """Write the bytes to ``path`` (parents created), then let go of them.

        A whole file appears at once (written next to it, then renamed over it), so a reader
        never sees half of one; ``append`` adds to what is there instead (a stream's log file).
        """
        if self.data is None:
            raise RuntimeError(f"the content for {path} was already written")
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        try:
            if append:
                with open(path, "ab") as fh:
                    fh.write(self.data)
            else:
                temporary = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}")
                fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
                try:
                    with os.fdopen(fd, "wb") as fh:
                        fh.write(self.data)
                    os.replace(temporary, path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(temporary)
                    raise
            if self.executable:
                mode = os.stat(path).st_mode
                os.chmod(path, mode | ((mode & 0o444) >> 2))  # x wherever r is, as chmod +x does
        finally:
            self.release()

    def release(self) -> None:
        """Drop the bytes (unmap them) now rather than when the object goes."""
        data, self.data = self.data, None
        if isinstance(data, mmap.mmap):
            data.close()


def task_relative_name(path: str) -> str:
    """Where a submit-side path lives inside a task's directory on the endpoint.

    A relative path keeps its name (``data/in.csv`` is ``data/in.csv`` there too, so a command
    that names it literally works unchanged); an absolute one, or one that climbs out with
    ``..``, goes under ``_tether_files/<digest of the absolute path>/<its name>``, so two files of
    the same name from different directories never meet.
    """
    norm = os.path.normpath(path)
    if not os.path.isabs(norm) and norm != ".." and not norm.startswith(".." + os.sep) and norm != ".":
        return norm
    absolute = os.path.abspath(path)
    digest = hashlib.sha256(absolute.encode()).hexdigest()[:12]
    return os.path.join(ELSEWHERE, digest, os.path.basename(absolute) or "file")


def inside(directory: str, name: str) -> str:
    """``directory/name``, refusing a name that would leave the directory."""
    target = os.path.normpath(os.path.join(directory, name))
    if os.path.isabs(name) or not target.startswith(os.path.normpath(directory) + os.sep):
        raise ValueError(f"{name!r} is not a path inside the task's directory")
    return target


def remove_tree(path: str) -> None:
    """Remove a task's directory and everything in it (what could not be removed stays)."""
    shutil.rmtree(path, ignore_errors=True)


__all__ = ["ELSEWHERE", "FileContent", "inside", "remove_tree", "task_relative_name"]
