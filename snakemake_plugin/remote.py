"""What runs on the endpoint for each Snakemake job.

This module is shipped by value with every task (see ``register_pickle_by_value`` in the
executor), so an endpoint needs Tether and Snakemake but not this plugin. Keep it to the
standard library and ``tether``: anything imported at module level must exist on the endpoint.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import uuid
from pathlib import Path

from tether.files import FileContent, inside
from tether.runtime import current_task
from tether.shell import ShellFunction, ShellResult, collect_result

from . import warm

#: the variable the job command names its interpreter by (see Executor.get_python_executable)
PYTHON_VAR = "TETHER_PYTHON"
#: the variable that holds SNAKEMAKE_MAIN for the job command
MAIN_VAR = "TETHER_SNAKEMAKE_MAIN"

#: ``python -c "$TETHER_SNAKEMAKE_MAIN" -m snakemake ARGS`` runs ``python -m snakemake ARGS``, less a
#: second of waiting: Snakemake's scheduler re-arms a one-second ``threading.Timer`` (its job rate
#: limiter) on every round, and that thread is not a daemon, so each job's interpreter waited up to
#: a second at exit after its work was done (measured: 2.4 s -> 1.4 s for a trivial job). Here the
#: timer is a daemon; nothing else changes. Checked with Snakemake 9.27; if a Snakemake stops
#: using threading.Timer this is a plain ``-m snakemake``.
SNAKEMAKE_MAIN = """\
import runpy, sys, threading

class _DaemonTimer(threading.Timer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.daemon = True

threading.Timer = _DaemonTimer
if sys.argv[1:3] == ["-m", "snakemake"]:
    del sys.argv[1:3]
runpy.run_module("snakemake", run_name="__main__", alter_sys=True)
"""

#: the warm runner's text, read here (on the submitting side) and carried with the job function:
#: the endpoint does not have this plugin installed
WARM_SOURCE = Path(warm.__file__).read_text()


def run_snakemake_job(cmd: str, workdir: str | None, walltime: float | None, mpi: bool, snippet_lines: int,
                      warm_key: str | None = None, files: dict[str, FileContent] | None = None,
                      products: list[str] | None = None,
                      logs: list[str] | None = None) -> ShellResult | tuple[ShellResult, dict[str, FileContent]]:
    """Run one ``python -m snakemake ...`` job command under bash, as a ShellFunction would.

    With ``warm_key`` (the workflow's Snakefile) the job's ``python`` is the warm runner's client
    (see :mod:`.warm`): the command, and so everything Snakemake does, is unchanged, but Snakemake
    starts in a fork of this worker's runner instead of a new interpreter. Without one, or when
    the runner cannot be had, the job starts cold and its stderr (and the endpoint's log) says why.

    Without a shared file system (see :mod:`.staging`) ``files`` are written into the task's
    sandbox, where the job runs, and with ``products`` the result is ``(ShellResult, files)``:
    the products the job made when it succeeded, and its ``logs`` whether it succeeded or not.

    The job runs with the endpoint's own environment first on ``PATH`` (as if its virtualenv
    were activated): ``$TETHER_PYTHON`` and ``python`` are the endpoint's interpreter, which has
    Snakemake, and ``mpiexec`` from the ``mpich`` wheel is found. With ``mpi`` the job also gets
    Parsl's MPI variables (``$PARSL_MPI_PREFIX``, ``$PARSL_NUM_RANKS``, ...) for the ranks its
    resource specification asked for (the rule's own command starts the ranks), and runs without
    ``PYTHONUNBUFFERED``, like an MPIFunction.
    """
    task = current_task()
    sandbox = task.sandbox if task is not None and task.sandbox else os.getcwd()
    os.makedirs(sandbox, exist_ok=True)
    for name, content in (files or {}).items():
        content.write(inside(sandbox, name))
    job_env = {PYTHON_VAR: sys.executable, MAIN_VAR: SNAKEMAKE_MAIN}
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if bindir not in path.split(os.pathsep):
        job_env["PATH"] = os.pathsep.join(p for p in (bindir, path) if p)
    unset: tuple[str, ...] = ()
    if mpi:
        from tether.mpi import UNSET_FOR_MPI, task_mpi_environment

        job_env.update(task_mpi_environment())
        unset = tuple(UNSET_FOR_MPI)
    socket_path, why = warm.ensure_runner(WARM_SOURCE, warm_key) if warm_key is not None else (None, None)
    result = None
    argv = _plain_arguments(cmd) if socket_path is not None else None
    if socket_path is not None and argv is not None:  # no shell needed: the worker asks the runner itself
        result = _run_warm(cmd, argv, socket_path, job_env, unset, workdir or sandbox, sandbox, walltime,
                           snippet_lines)
    if result is None:
        if socket_path is not None:
            try:
                job_env[PYTHON_VAR] = warm.client_script(WARM_SOURCE)
                job_env[warm.SOCKET_VAR] = socket_path
            except OSError as exc:
                why = str(exc)
        if why is not None:
            message = f"tether: not using the warm Snakemake runner: {why}; starting a new interpreter"
            logging.getLogger("tether.snakemake").warning(message)
            cmd = f"echo {shlex.quote(message)} >&2; {cmd}"
        if unset:
            cmd = f"unset {' '.join(unset)}; {cmd}"
        # the command is literal text, not a template: braces in Snakemake's arguments stay as they are
        literal = cmd.replace("{", "{{").replace("}", "}}")
        result = ShellFunction(literal, walltime=walltime, cwd=workdir, env=job_env, snippet_lines=snippet_lines,
                               name="snakemake job")()
    if products is None:
        return result
    wanted = [*(products if result.returncode == 0 else ()), *(logs or ())]
    return result, _collect(sandbox, wanted)


#: how every job command this plugin writes begins (Executor.get_python_executable, then Snakemake's)
COMMAND_HEAD = f'"${PYTHON_VAR}" -c "${MAIN_VAR}" '
#: outside single quotes, characters that ask bash for more than splitting words
_SHELL_SPECIAL = frozenset('$`"\\;&|<>(){}!*?[]~#\n')


def _plain_arguments(cmd: str) -> list[str] | None:
    """The job command's arguments after its interpreter when bash would only split them into words
    and strip single quotes (the usual command: Snakemake quotes what it must); None when bash has
    more to do (``--envvars`` exports, a precommand, a variable), and the command then runs in bash."""
    if not cmd.startswith(COMMAND_HEAD):
        return None
    rest = cmd[len(COMMAND_HEAD):]
    quoted = False
    for char in rest:
        if char == "'":
            quoted = not quoted
        elif not quoted and char in _SHELL_SPECIAL:
            return None
    return None if quoted else shlex.split(rest)


def _run_warm(cmd: str, argv: list[str], socket_path: str, job_env: dict[str, str], unset: tuple[str, ...],
              cwd: str, sandbox: str, walltime: float | None, snippet_lines: int) -> ShellResult | None:
    """The job through the runner, from this worker, with what the shell would have given it (the
    environment, the sandbox's output files, the walltime); None if the runner could not be reached."""
    env = dict(os.environ)
    for name in unset:
        env.pop(name, None)
    env.update(job_env)
    task = current_task()
    if task is not None:
        env["TETHER_TASK_ID"] = task.task_id
    env["TETHER_TASK_SANDBOX"] = sandbox
    stem = os.path.join(sandbox, f"tether-{uuid.uuid4().hex[:12]}")
    out_path, err_path = f"{stem}.stdout", f"{stem}.stderr"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
    fds = [os.open(os.devnull, os.O_RDONLY), os.open(out_path, flags, 0o600), os.open(err_path, flags, 0o600)]
    try:
        status, timed_out = warm.run_in_runner(socket_path, [SNAKEMAKE_MAIN, *argv], env, cwd, fds, walltime)
    except OSError as exc:  # nothing ran: the shell path (with its client) takes the job
        logging.getLogger("tether.snakemake").warning("the warm Snakemake runner at %s: %s", socket_path, exc)
        for name in (out_path, err_path):
            os.unlink(name)
        return None
    except warm.RunnerLost as exc:
        with open(err_path, "a") as err:
            err.write(f"tether: {exc}\n")
        status, timed_out = 1, False
    finally:
        for fd in fds:
            os.close(fd)
    return collect_result(cmd, 128 - status if status < 0 else status, timed_out, out_path, err_path, snippet_lines)


def _collect(sandbox: str, names: list[str]) -> dict[str, FileContent]:
    """The files named (a directory: every file in it) that exist in the sandbox."""
    found: dict[str, FileContent] = {}
    for name in names:
        path = inside(sandbox, name)
        if os.path.isfile(path):
            found[name] = FileContent.read(path)
        elif os.path.isdir(path):
            for root, _, children in os.walk(path):
                for child in children:
                    full = os.path.join(root, child)
                    found[os.path.relpath(full, sandbox)] = FileContent.read(full)
    return found
