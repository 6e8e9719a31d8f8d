"""Shell commands and MPI programs as Tether functions.

``ShellFunction("echo {x}")`` is a picklable callable: submitted with keyword arguments, it
formats its command template with them and runs the command under ``/bin/bash`` in the task's
sandbox directory on the endpoint, returning a :class:`ShellResult` (return code and the last
lines of stdout and stderr)::

    with Executor(endpoint_id=EP) as ex:
        r = ex.submit(ShellFunction("echo {x}; echo oops >&2; exit 3"), x=42).result()
        r.returncode, r.stdout, r.stderr          # 3, '42\\n', 'oops\\n'

Template values are inserted as they are (as in Globus Compute), so a value is shell code:
``ShellFunction("ls {d}")`` called with ``d="; rm -rf ~"`` runs ``rm -rf ~``. Quote values that
come from anyone else: ``ShellFunction("ls {d}", quote=True)`` quotes every value
(``shlex.quote``), ``{d!q}`` quotes one.

``MPIFunction`` launches its command with the endpoint's MPI launcher (``$PARSL_MPI_PREFIX``),
with as many ranks as the Executor's ``resource_specification`` asks for.

How the command's processes are contained: the command runs in a process group of its own
(a new session), so a walltime kills all of it, children included. Its first process is a small
bash supervisor holding the read end of a pipe whose write end only the task's worker holds: if
the worker dies for any reason (a cancelled task's worker is killed with SIGKILL, the endpoint
is stopped), the pipe reads end-of-file and the supervisor kills the command's whole group. So
nothing a task started outlives a cancel.
"""

from __future__ import annotations

import os
import shlex
import signal
import string
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import TetherError
from .mpi import UNSET_FOR_MPI, task_mpi_environment
from .resources import check_mpi_specification
from .runtime import current_task

#: exception_name values, as Globus Compute's ShellResult reports them
TIMEOUT_NAME = "subprocess.TimeoutExpired"
FAILED_NAME = "subprocess.CalledProcessError"
#: return code of a command killed at its walltime (as timeout(1) does)
TIMEOUT_RETURNCODE = 124

# The supervisor: $1 is the lifeline's fd, $2 the command. A background subshell blocks reading
# the lifeline; end-of-file means the worker that started us is gone, so it kills our whole
# process group. The command itself runs in the foreground (normal signal dispositions). The
# watcher is reaped before we exit: an orphan would stay a zombie where PID 1 does not reap.
_SUPERVISOR = r"""
{ read -r -u "$1" _; kill -KILL 0; } &
watcher=$!
eval "exec $1<&-"
/bin/bash -c "$2"
rc=$?
kill "$watcher" 2>/dev/null
wait "$watcher" 2>/dev/null
exit "$rc"
"""


class ShellTemplateError(TetherError, KeyError):
    """The command template cannot be formatted with the arguments given (missing key, positional args)."""

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0]) if self.args else ""


class ShellCommandFailed(TetherError):
    """A ``check=True`` shell command exited with a non-zero code (or hit its walltime)."""

    def __init__(self, message: str = "", result: ShellResult | None = None, *_: Any):
        super().__init__(message)
        # (on the client this class is also mixed into TaskFailed, which calls it with other arguments)
        self.result = result if isinstance(result, ShellResult) else None

    @property
    def returncode(self) -> int | None:
        return self.result.returncode if self.result is not None else None

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.result))


@dataclass
class ShellResult:
    """What a shell command did: its return code and the last lines of its output streams.

    ``exception_name`` is ``"subprocess.TimeoutExpired"`` when the walltime killed the command
    (``returncode`` is then 124), ``"subprocess.CalledProcessError"`` for another non-zero exit,
    and ``None`` on success, as in Globus Compute.
    """

    cmd: str
    returncode: int
    stdout: str
    stderr: str
    exception_name: str | None = None

    def __str__(self) -> str:
        return f"Command {self.cmd!r} returned with exit status: {self.returncode}"


#: conversions a template field may carry: Python's three, and q (shell-quote the value)
_CONVERSIONS = (None, "s", "r", "a", "q")


class _Quote:
    """A value marked by ``{name!q}``: quoted after its format spec is applied."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


class _ShellFormatter(string.Formatter):
    """``str.format`` plus the ``!q`` conversion, and quoting of every value when ``quote_all``.

    A value is quoted after its format spec (``{x:>8}`` pads, then quotes) and only once, even
    when ``!q`` and ``quote_all`` meet.
    """

    def __init__(self, quote_all: bool):
        self.quote_all = quote_all

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if conversion == "q":
            return _Quote(value)
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> str:
        if isinstance(value, _Quote):
            return shlex.quote(format(value.value, format_spec))
        text = format(value, format_spec)
        return shlex.quote(text) if self.quote_all else text


def _template_fields(cmd: str) -> list[str]:
    """The top-level names a template uses; positional or malformed fields are errors in words."""
    hint = "write a literal brace as {{ or }} (e.g. '${{HOME}}', 'awk \"{{print $1}}\"')"
    try:
        parsed = list(string.Formatter().parse(cmd))
    except ValueError as exc:
        raise ValueError(f"ShellFunction command template {cmd!r} is malformed ({exc}); {hint}") from None
    names = []
    for _, field, _, conversion in parsed:
        if field is None:
            continue
        if conversion not in _CONVERSIONS:
            raise ValueError(
                f"ShellFunction command template {cmd!r} has the field {{{field}!{conversion}}}: the conversion "
                f"must be !q (shell-quote the value), !s, !r or !a; {hint}"
            )
        top = field.split(".", 1)[0].split("[", 1)[0]
        if not top.isidentifier():
            raise ValueError(
                f"ShellFunction command template {cmd!r} has the field {{{field}}}: fields must be names "
                f"filled from keyword arguments ({{x}}); {hint}"
            )
        if top not in names:
            names.append(top)
    return names


class ShellFunction:
    """A shell command to run on an endpoint; call it (submit it) with the template's keywords.

    Args:
        cmd: a command template: ``"{name}"`` fields are filled with the call's keyword arguments
            (``str.format``); write literal braces as ``{{`` and ``}}``. ``{name!q}`` inserts the
            value shell-quoted (``shlex.quote``): one word, never code.
        quote: shell-quote every value (as ``!q`` does). Off by default, as in Globus Compute:
            an unquoted value is shell code, so ``"ls {d}"`` with ``d="; rm -rf ~"`` runs
            ``rm -rf ~``. Turn it on (or use ``!q``) for any value you did not write yourself;
            leave it off only where a value is meant to be code (``"{flags}"`` as several words).
        walltime: seconds after which the command's whole process group is killed (SIGTERM, then
            SIGKILL after a grace period); the result then has ``returncode`` 124.
        snippet_lines: how many of the last lines of stdout and of stderr the result carries.
        name: a display name (``__name__``).
        check: make a non-zero exit a task failure (:class:`ShellCommandFailed`, whose message
            shows the return code and the tail of stderr) instead of a result.
        env: extra environment variables for the command.
        cwd: where the command runs; a relative path is taken inside the task's sandbox
            directory (and created), which is the default. The captured output files are
            always in the sandbox.
    """

    #: seconds between SIGTERM and SIGKILL when the walltime is reached
    kill_grace: float = 2.0

    def __init__(
        self,
        cmd: str,
        *,
        walltime: float | None = None,
        snippet_lines: int = 1000,
        name: str | None = None,
        check: bool = False,
        env: Mapping[str, Any] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        quote: bool = False,
    ):
        if not isinstance(cmd, str) or not cmd.strip():
            raise TypeError(f"ShellFunction needs a command string, not {cmd!r}")
        if walltime is not None and (isinstance(walltime, bool) or not isinstance(walltime, int | float)
                                     or walltime <= 0):
            raise ValueError(f"walltime must be a positive number of seconds, not {walltime!r}")
        if isinstance(snippet_lines, bool) or not isinstance(snippet_lines, int) or snippet_lines < 0:
            raise ValueError(f"snippet_lines must be a non-negative integer, not {snippet_lines!r}")
        if env is not None and not isinstance(env, Mapping):
            raise TypeError(f"env must be a mapping of variable names to values, not {type(env).__name__}")
        self.cmd = cmd
        self.fields = _template_fields(cmd)
        self.walltime = walltime
        self.snippet_lines = snippet_lines
        self.name = name
        self.check = check
        self.env = {str(k): str(v) for k, v in (env or {}).items()}
        self.cwd = os.fspath(cwd) if cwd is not None else None
        self.quote = bool(quote)

    @property
    def __name__(self) -> str:
        return self.name or f"{type(self).__name__}: {self.cmd}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cmd!r})"

    # --- at submit ---------------------------------------------------------------------------
    def validate_call(self, args: tuple[Any, ...], kwargs: dict[str, Any],
                      resource_specification: dict[str, Any] | None) -> None:
        """Called by the Executor at submit: a call that cannot format the template fails here."""
        self.format(args, kwargs)

    def format(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """The command line for these arguments, or a :class:`ShellTemplateError` saying what is wrong."""
        name = type(self).__name__
        if args:
            example = ", ".join(f"{f}=..." for f in self.fields) or "key=..."
            raise ShellTemplateError(
                f"{name} takes keyword arguments only (they fill the command template {self.cmd!r}); "
                f"got {len(args)} positional argument(s): use ex.submit(fn, {example})"
            )
        missing = [f for f in self.fields if f not in kwargs]
        if missing:
            given = ", ".join(sorted(kwargs)) or "none"
            raise ShellTemplateError(
                f"{name} command template {self.cmd!r} needs the keyword argument(s) "
                f"{', '.join(missing)}; given: {given}"
            )
        try:
            return _ShellFormatter(getattr(self, "quote", False)).vformat(self.cmd, (), kwargs)
        except Exception as exc:  # noqa: BLE001 - attribute/index/format-spec errors, in words
            raise ShellTemplateError(
                f"{name} command template {self.cmd!r} cannot be formatted with {sorted(kwargs)}: "
                f"{type(exc).__name__}: {exc}"
            ) from None

    # --- on the endpoint ---------------------------------------------------------------------
    def __call__(self, **kwargs: Any) -> ShellResult:
        return self._execute(self.format((), kwargs), {})

    def _execute(self, cmd: str, extra_env: Mapping[str, str], unset: tuple[str, ...] = ()) -> ShellResult:
        task = current_task()
        sandbox = Path(task.sandbox) if task is not None and task.sandbox else Path.cwd()
        sandbox.mkdir(parents=True, exist_ok=True)
        workdir = sandbox
        if self.cwd:
            cwd = Path(os.path.expanduser(self.cwd))
            workdir = cwd if cwd.is_absolute() else sandbox / cwd
            if not cwd.is_absolute():
                workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        for name in unset:
            env.pop(name, None)
        env.update(self.env)
        env.update(extra_env)
        if task is not None:
            env["TETHER_TASK_ID"] = task.task_id
        env["TETHER_TASK_SANDBOX"] = str(sandbox)

        stem = sandbox / f"tether-{uuid.uuid4().hex[:12]}"
        out_path, err_path = f"{stem}.stdout", f"{stem}.stderr"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND  # many writers (MPI ranks): no overwrites
        out_fd = os.open(out_path, flags, 0o600)
        err_fd = os.open(err_path, flags, 0o600)
        life_r, life_w = os.pipe()  # non-inheritable: only this process holds the write end
        timed_out = False
        try:
            try:
                proc = subprocess.Popen(
                    ["/bin/bash", "-c", _SUPERVISOR, "tether-shell", str(life_r), cmd],
                    stdin=subprocess.DEVNULL, stdout=out_fd, stderr=err_fd, cwd=workdir, env=env,
                    start_new_session=True, pass_fds=(life_r,), close_fds=True,
                )
            except OSError as exc:  # no /bin/bash, a cwd that does not exist: say which
                _unlink(out_path, err_path)
                raise type(exc)(exc.errno, f"cannot start the command in {workdir}: {exc.strerror}",
                                exc.filename) from None
            finally:
                os.close(life_r)
                os.close(out_fd)
                os.close(err_fd)
            try:
                proc.wait(timeout=self.walltime)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc, self.kill_grace)
            except BaseException:  # interrupted: never leave the command behind
                _kill_group(proc, 0)
                raise
        finally:
            os.close(life_w)
        result = collect_result(cmd, proc.returncode, timed_out, out_path, err_path, self.snippet_lines)
        if self.check and result.returncode != 0:
            raise ShellCommandFailed(_failure_message(result, self.walltime), result)
        return result


class MPIFunction(ShellFunction):
    """A shell command launched on MPI ranks: it runs as ``$PARSL_MPI_PREFIX <cmd>``.

    The ranks come from the Executor's ``resource_specification`` (Parsl's keys ``num_nodes``,
    ``ranks_per_node``, ``num_ranks``, ``launcher_options``), which must say how many ranks to
    start. The command's environment carries ``PARSL_MPI_PREFIX`` (and ``TETHER_MPI_PREFIX``),
    ``PARSL_NUM_RANKS``, ``PARSL_RANKS_PER_NODE``, ``PARSL_NUM_NODES`` and ``PARSL_MPI_NODELIST``
    as Parsl's MPI apps expect.
    """

    def validate_call(self, args: tuple[Any, ...], kwargs: dict[str, Any],
                      resource_specification: dict[str, Any] | None) -> None:
        super().validate_call(args, kwargs, resource_specification)
        check_mpi_specification(resource_specification)

    def __call__(self, **kwargs: Any) -> ShellResult:
        cmd = self.format((), kwargs)
        # the user's env= still wins over the MPI variables
        return self._execute(f"$PARSL_MPI_PREFIX {cmd}", task_mpi_environment(), unset=UNSET_FOR_MPI)


def collect_result(cmd: str, returncode: int, timed_out: bool, out_path: str, err_path: str,
                   snippet_lines: int) -> ShellResult:
    """The result of a command whose output went to ``out_path`` and ``err_path``: the last
    ``snippet_lines`` of each (the files are removed when the result holds all of them), and 124 if
    its walltime killed it. Shared with what runs a command another way (the Snakemake plugin's
    warm runner), so a result reads the same whichever way its command ran."""
    returncode = TIMEOUT_RETURNCODE if timed_out else returncode
    out, out_trimmed = _tail(out_path, snippet_lines)
    err, err_trimmed = _tail(err_path, snippet_lines)
    if not (out_trimmed or err_trimmed):  # the result holds everything: nothing to keep
        _unlink(out_path, err_path)
    name = TIMEOUT_NAME if timed_out else (FAILED_NAME if returncode != 0 else None)
    return ShellResult(cmd, returncode, out, err, name)


# --- helpers ---------------------------------------------------------------------------------
def _kill_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the command's process group, then SIGKILL whatever is left after ``grace`` seconds."""
    pgid = proc.pid  # the session leader: its pid is the group id
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, or its zombie keeps the group alive
        if not _group_alive(pgid):
            break  # the whole group is gone (no event announces this: poll)
        time.sleep(0.02)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _unlink(*paths: str) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass


def _group_alive(pgid: int) -> bool:
    """Whether a process group has a live (non-zombie) member. Zombies count as gone: orphans
    are reparented to PID 1, which in many containers never reaps them."""
    try:
        entries = os.listdir("/proc")
    except OSError:  # no procfs: the kernel's answer (zombies included)
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


def _tail(path: str, lines: int, block: int = 64 * 1024) -> tuple[str, bool]:
    """The last ``lines`` lines of a file, read from its end (a huge output costs no memory);
    and whether anything before them was left out."""
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        if lines <= 0 or size == 0:
            return "", size > 0
        data = b""
        pos = size
        while pos > 0:
            step = min(block, pos)
            pos -= step
            fh.seek(pos)
            data = fh.read(step) + data
            # a final newline ends the last line; it does not start another one
            if data.count(b"\n", 0, len(data) - 1) >= lines:
                break
    parts = data.splitlines(keepends=True)
    kept = parts[-lines:]
    trimmed = pos > 0 or len(parts) > lines
    return b"".join(kept).decode("utf-8", errors="replace"), trimmed


def _failure_message(result: ShellResult, walltime: float | None, tail_lines: int = 20) -> str:
    if result.exception_name == TIMEOUT_NAME:
        head = (f"command was killed at its walltime of {walltime} s "
                f"(returncode {result.returncode}): {result.cmd}")
    else:
        head = f"command exited with returncode {result.returncode}: {result.cmd}"
    tail = "".join(result.stderr.splitlines(keepends=True)[-tail_lines:])
    if tail:
        return f"{head}\n--- last lines of stderr ---\n{tail.rstrip()}"
    return f"{head}\n(stderr was empty)"


__all__ = ["MPIFunction", "ShellCommandFailed", "ShellFunction", "ShellResult", "ShellTemplateError", "collect_result"]
