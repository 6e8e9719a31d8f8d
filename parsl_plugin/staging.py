"""Parsl's files through Tether, for a submitter and an endpoint that share no file system.

Parsl's seam for moving files is the staging provider (``parsl.data_provider.staging.Staging``).
:class:`TetherFileStaging` takes every ``file``-scheme :class:`~parsl.data_provider.files.File`
an app is given (in ``inputs``, ``outputs``, other arguments, ``stdout``/``stderr``) and moves it
in the task itself, the way Parsl's ``HTTPInTaskStaging`` does, except that the bytes ride in the
task's arguments and result (:class:`tether.files.FileContent`: inline when small, a blob streamed
through the service when large), so they need neither a shared file system nor any route between
the two machines beyond the one Tether already has.

The journey of one app try:

1. the DataFlowKernel asks the provider to stage each file; the provider points the file's
   ``local_path`` at a name inside the task's directory on the endpoint
   (:func:`tether.files.task_relative_name`) and remembers which way the file goes;
2. when the try is launched (its input files exist by then: Parsl waited for the apps that make
   them), :func:`outbound` maps each input file and describes what must come back
   (:class:`Bundle`, which travels with the task; :class:`Landing`, which stays here);
   ``stdout``/``stderr`` given as paths come back too, though Parsl never stages those;
3. on the endpoint (:meth:`Bundle.unpack`, :meth:`Bundle.collect`, called by
   :class:`~tether.parsl.remote.RemoteApp`) the app runs in a fresh directory of its own holding
   its inputs; when it returns, its outputs (only if it succeeded, all of them or an error in
   words) and its streams (always) are mapped and travel back in the result; the directory goes;
4. here, :meth:`Landing.land` writes them to the submitter's paths before the app's future
   resolves, so a DataFuture's file exists when the next app starts.

What this leans on of Parsl beyond the ``Staging`` interface (checked with parsl 2026.10.26): the
DataFlowKernel hands the provider the very File objects it then passes to the executor (so a
mark found on one is found on the other), an app's exception comes back as a
``RemoteExceptionWrapper`` value (``e_type``, ``e_value``), and ``parsl.utils.get_std_fname_mode``
reads a stream argument.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from parsl.data_provider.files import File
from parsl.data_provider.staging import Staging
from parsl.utils import RepresentationMixin

from tether.files import FileContent, inside, task_relative_name

#: the keyword argument that carries a :class:`Bundle` to the endpoint (removed there before the app runs)
STAGING_KWARG = "_tether_staging"
#: the streams of a bash app, which Parsl leaves to the app to open
STREAMS = ("stdout", "stderr")
_IN, _OUT = "in", "out"


class TetherFileStaging(Staging, RepresentationMixin):
    """Move ``file``-scheme Files between this machine and the endpoint through Tether.

    For :class:`~tether.parsl.TetherExecutor` only (``staging="tether"``, its default, puts one in
    ``storage_access``): the bytes are attached by the executor when it launches the app.
    A relative path is relative to the submitting process's current directory here, and to the
    app's own directory on the endpoint.
    """

    def __init__(self) -> None:
        #: File copies this provider staged, and which way (the DataFlowKernel hands each task fresh copies)
        self._marked: weakref.WeakKeyDictionary[File, tuple[str, str]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def can_stage_in(self, file: File) -> bool:
        return file.scheme == "file"

    def can_stage_out(self, file: File) -> bool:
        return file.scheme == "file"

    def stage_in(self, dm: Any, executor: str, file: File, parent_fut: Any) -> None:
        self._mark(file, _IN)
        return None  # no separate task: the bytes travel with the app's own

    def stage_out(self, dm: Any, executor: str, file: File, app_fu: Any) -> None:
        self._mark(file, _OUT)
        return None  # the output's DataFuture completes with the app, after its files landed

    def _mark(self, file: File, direction: str) -> None:
        source = os.path.abspath(file.path)  # now: the submitting process may change directory later
        file.local_path = task_relative_name(file.path)
        with self._lock:
            self._marked[file] = (direction, source)

    def marked(self, file: Any) -> tuple[str, str] | None:
        """(``"in"`` or ``"out"``, the absolute path here) for a File this provider staged, else None."""
        if not isinstance(file, File):
            return None
        with self._lock:
            return self._marked.get(file)


@dataclass
class Outgoing:
    """A file to bring back from the endpoint: a declared output, or a stream (``always``: also
    when the app failed, as Parsl leaves a failed bash app's stdout/stderr behind)."""

    name: str  # inside the task's directory
    file: File | None = None  # the File whose ``local_path`` is set there (None for a stream given as a path)
    stream: str | None = None  # "stdout"/"stderr" when the app's keyword argument must point there
    always: bool = False


@dataclass
class Bundle:
    """What travels to the endpoint with an app: its input files' bytes, and what to bring back."""

    inputs: list[tuple[File, FileContent]] = field(default_factory=list)
    outgoing: list[Outgoing] = field(default_factory=list)

    # --- on the endpoint -------------------------------------------------------------------------
    def unpack(self, directory: str, kwargs: dict[str, Any]) -> None:
        """Write the inputs into ``directory`` and point every staged File (and the streams) there.

        Paths become absolute, so they hold even where the app cannot be moved into its
        directory (an engine running tasks in threads) or changes directory itself.
        """
        for file, content in self.inputs:
            target = inside(directory, file.local_path or file.filename)
            content.write(target)  # the bytes are let go of here, before the app runs
            file.local_path = target
        for out in self.outgoing:
            target = inside(directory, out.name)
            if out.file is not None:
                out.file.local_path = target
            if out.stream is not None:
                kwargs[out.stream] = out.file if out.file is not None else target
            elif os.path.dirname(out.name):
                os.makedirs(os.path.dirname(target), exist_ok=True)  # as on a shared file system, where it existed

    def collect(self, value: Any, app_name: str, directory: str) -> StagedResult:
        """The app's value plus the files that go back, mapped before ``directory`` is removed.

        A failed app (Parsl hands it back as a ``RemoteExceptionWrapper``) returns its streams
        only; an app that did not make every declared output fails with Parsl's
        ``MissingOutputs``, naming them, and returns none of them.
        """
        from parsl.app.errors import MissingOutputs, RemoteExceptionWrapper

        found = [self._find(out, directory) for out in self.outgoing]
        if isinstance(value, RemoteExceptionWrapper) and self._found_elsewhere(value, found):
            value = 0  # what Parsl's bash wrapper returns when the command succeeded and made its outputs
        failed = isinstance(value, RemoteExceptionWrapper)
        if not failed:
            missing = [out for out, path in zip(self.outgoing, found, strict=True) if path is None and not out.always]
            if missing:
                names = ", ".join(repr(out.file.url if out.file is not None else out.name) for out in missing)
                exc = MissingOutputs(f"app {app_name} succeeded but did not make its output file(s) {names} "
                                     f"(looked for in its directory on the endpoint)",
                                     [out.file for out in missing if out.file is not None])
                value, failed = RemoteExceptionWrapper(MissingOutputs, exc, None), True
        contents: list[tuple[FileContent, tuple[int, int, int]] | None] = []
        for out, path in zip(self.outgoing, found, strict=True):
            if path is not None and (out.always or not failed):
                content = FileContent.read(path, what=f"output {out.name!r} of app {app_name}")
                info = os.stat(path)
                contents.append((content, (info.st_ino, info.st_size, info.st_mtime_ns)))
            else:
                contents.append(None)
        for file in self._files():  # Files that travel back (in a value or an error) name the submitter's paths
            file.local_path = None
        return StagedResult(value, contents)

    def _found_elsewhere(self, failure: Any, found: list[str | None]) -> bool:
        """Whether a bash app's ``MissingOutputs`` (Parsl looks in the app's directory only) names
        outputs that are all where :meth:`_find` found them: the command wrote them itself."""
        from parsl.app.errors import MissingOutputs

        if failure.e_type is not MissingOutputs or not getattr(failure.e_value, "outputs", None):
            return False
        located = {id(out.file) for out, path in zip(self.outgoing, found, strict=True)
                   if out.file is not None and path is not None}
        return all(id(file) in located for file in failure.e_value.outputs)

    @staticmethod
    def _find(out: Outgoing, directory: str) -> str | None:
        """Where the app left an outgoing file: in its directory, or, for an output named by an
        absolute path, at that very path (a command that wrote to ``/scratch/x`` itself instead of
        to ``{outputs[0]}``, which works where both sides see one file system)."""
        path = inside(directory, out.name)
        if os.path.isfile(path):
            return path
        if out.file is not None and out.stream is None and os.path.isabs(out.file.path) \
                and os.path.isfile(out.file.path):
            return out.file.path
        return None

    def _files(self) -> Iterator[File]:
        yield from (file for file, _ in self.inputs)
        yield from (out.file for out in self.outgoing if out.file is not None)


@dataclass
class StagedResult:
    """An app's value plus its outgoing files, in :attr:`Bundle.outgoing`'s order: each file's
    content and its (inode, size, mtime) on the endpoint, or None for one that does not come back."""

    value: Any
    contents: list[tuple[FileContent, tuple[int, int, int]] | None]


@dataclass
class Landing:
    """Where, on this machine, each of a :class:`Bundle`'s outgoing files goes (kept here)."""

    paths: list[tuple[str, bool]]  # (absolute path, append), in Bundle.outgoing's order

    def land(self, result: StagedResult) -> Any:
        """Write what came back, then return the app's value. A file that cannot be written fails
        the app, in words. A file that is already here, the very one the endpoint read (same
        inode, size and modification time: both sides see one file system), is left alone."""
        for (path, append), item in zip(self.paths, result.contents, strict=True):
            if item is None:
                continue
            content, stamp = item
            if _same_file(path, stamp):
                content.release()
                continue
            try:
                content.write(path, append=append)
            except OSError as exc:
                raise OSError(exc.errno, f"the endpoint sent back {path}, but it cannot be written here: "
                                         f"{exc.strerror or exc}") from None
        return result.value


def _same_file(path: str, stamp: tuple[int, int, int]) -> bool:
    try:
        info = os.stat(path)
    except OSError:
        return False
    return (info.st_ino, info.st_size, info.st_mtime_ns) == stamp


def outbound(staging: list[TetherFileStaging], app_name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
             streams: bool) -> tuple[Bundle, Landing] | None:
    """The files of one app try, read from this machine now: what travels (:class:`Bundle`) and
    where what comes back goes (:class:`Landing`); None when the try moves no file.

    Looks where Parsl's DataFlowKernel looks for Files (positional arguments, keyword arguments,
    ``inputs``; ``outputs``, ``stdout``, ``stderr``), and takes only those one of ``staging``
    marked. With ``streams``, ``stdout``/``stderr`` given as paths (or ``(path, mode)``) come back too.
    """
    bundle, paths = Bundle(), []
    seen_in: set[str] = set()
    seen_out: dict[str, int] = {}

    def mark_of(obj: Any) -> tuple[str, str] | None:
        for provider in staging:
            found = provider.marked(obj)
            if found is not None:
                return found
        return None

    def take_input(obj: Any) -> None:
        found = mark_of(obj)
        if found is None or found[0] != _IN or obj.local_path in seen_in:
            return
        seen_in.add(obj.local_path)
        content = FileContent.read(found[1], what=f"input {obj.url!r} of app {app_name}")
        bundle.inputs.append((obj, content))

    def take_output(obj: Any, stream: str | None = None, append: bool = False, path: str | None = None) -> None:
        found = None if isinstance(obj, str) else mark_of(obj)
        if found is None and path is None:
            return
        name = obj.local_path if isinstance(obj, File) else task_relative_name(obj)
        if name in seen_out:  # e.g. stdout and stderr to one file: it comes back once
            known = bundle.outgoing[seen_out[name]]
            if stream is not None:
                known.always = True
                known.stream = known.stream or stream
            return
        seen_out[name] = len(bundle.outgoing)
        bundle.outgoing.append(Outgoing(name=name, file=obj if isinstance(obj, File) else None, stream=stream,
                                        always=stream is not None))
        paths.append((found[1] if found is not None else os.path.abspath(path or ""), append))

    for value in args:
        take_input(value)
    for key, value in kwargs.items():
        if key not in (*STREAMS, "inputs", "outputs"):
            take_input(value)
    for value in kwargs.get("inputs") or ():
        take_input(value)
    for value in kwargs.get("outputs") or ():
        take_output(value)
    for stream in STREAMS:
        spec = kwargs.get(stream)
        if isinstance(spec, File):
            take_output(spec, stream=stream)
        elif spec is not None and streams:
            fname, mode = _stream_spec(stream, spec)
            take_output(fname, stream=stream, append="a" in mode, path=fname)
    if not bundle.inputs and not bundle.outgoing:
        return None
    return bundle, Landing(paths)


def _stream_spec(stream: str, spec: Any) -> tuple[str, str]:
    """Parsl's reading of a ``stdout``/``stderr`` argument: a path (appended to) or ``(path, mode)``."""
    from parsl.utils import get_std_fname_mode

    fname, mode = get_std_fname_mode(stream, spec)
    return os.fspath(fname), mode


__all__ = ["STAGING_KWARG", "Bundle", "Landing", "Outgoing", "StagedResult", "TetherFileStaging", "outbound"]
