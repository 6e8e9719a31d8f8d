"""The warm job runner: a Snakemake job starts in a fork of a process that has already imported
Snakemake, not in a new interpreter (which spent ~1.3 s of every trivial job on imports).

Three roles, one file, because the endpoint has Tether and Snakemake but not this plugin:
:mod:`.remote` carries this file's text with each task and writes it, once, as an executable
script ``#!python -IS`` (:func:`client_script`), run as ``python SCRIPT serve PATH`` (the runner)
and as the job's ``python`` (the client: isolated and without ``site``, it starts in ~20 ms).
Keep it to the standard library.

- **worker** (:func:`ensure_runner`, in the endpoint's worker process): starts the runner once
  per worker and key (the workflow's Snakefile and the interpreter), in a session of its own,
  holding the read end of a pipe only the worker can write to: when the worker goes (a cancel
  kills it, the endpoint stops), the runner kills its jobs and ends. So a runner is never shared
  between users or endpoints, and dies with the worker that owns it.
- **runner** (:func:`serve`): imports Snakemake (and what a job's first steps import lazily),
  then listens on a Unix socket in a directory only its user can enter. For each job it forks a
  child that becomes the job: a new session, the client's stdin/stdout/stderr (passed as file
  descriptors), its working directory, environment and umask, and then ``python -c CODE ARGS``
  exactly as the interpreter would run it (``SystemExit``, ``atexit``, non-daemon threads).
  Every job is a fresh fork, so nothing one job does reaches the next.
- **client** (:func:`client`): what the job's command runs where it said ``python``; bash has
  already expanded the command (exports, quoting), so the client sends its own argv, environment
  and cwd, waits, and exits with the job's status. When the client dies (walltime, cancel: the
  shell's process group is killed), the runner sees the socket close and kills the job's process
  group (SIGTERM, SIGKILL after a grace period). When the runner cannot be reached, the client
  says so on stderr and ``exec``s the real interpreter: today's cold path.
"""

from __future__ import annotations

# the client starts with every job: only modules that cost nothing to import up here (``socket``
# pulls in enum, selectors and collections: ~30 ms under load; ``_socket`` has all the client uses)
import _socket
import marshal
import os
import struct
import sys

TYPE_CHECKING = False  # not typing's: importing typing costs the client more than the rest together
if TYPE_CHECKING:
    import socket
    import subprocess

#: the environment variable naming the runner's socket, for the client
SOCKET_VAR = "TETHER_WARM_SOCKET"
#: seconds a runner with no job waits before it ends (the next job starts another)
IDLE_SECONDS = 600.0
#: seconds between SIGTERM and SIGKILL for a job whose client went away
KILL_GRACE = 2.0
#: a message: its length (8 bytes), then a marshalled tuple (formats, not struct.Struct objects:
#: this module travels pickled by value, and those do not pickle)
_HEADER = "!Q"
_HEADER_SIZE = struct.calcsize(_HEADER)
#: the runner's answer: the job's status, as os.waitstatus_to_exitcode gives it (-N: signal N)
_STATUS = "!i"
_STATUS_SIZE = struct.calcsize(_STATUS)
#: the request that only asks whether the runner is there
_PING = "ping"

# --- client ------------------------------------------------------------------------------------


def client(argv: list[str]) -> None:
    """Run ``python ARGV`` in the runner (``argv`` must start with ``-c CODE``); exit as it did."""
    path = os.environ.get(SOCKET_VAR)
    why = None
    if len(argv) < 2 or argv[0] != "-c":
        why = f"it runs only 'python -c CODE ...', not {argv[:1]}"
    elif not path:
        why = f"${SOCKET_VAR} is not set"
    if why is None:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.connect(path)
            request = marshal.dumps(("job", argv[1:], dict(os.environ), os.getcwd(), _umask()))
            _send(sock, request, [0, 1, 2])
        except OSError as exc:
            why = f"cannot reach it at {path}: {exc}"
        else:
            status = _recv_exactly(sock, _STATUS_SIZE)
            if status is None:
                print("tether: the warm Snakemake runner ended while the job ran", file=sys.stderr)
                sys.exit(1)
            code = struct.unpack(_STATUS, status)[0]
            if code < 0:  # killed by a signal: die of it, so the shell reports 128+N as it would
                import signal

                try:
                    signal.signal(-code, signal.SIG_DFL)
                except (OSError, ValueError):  # SIGKILL, SIGSTOP: already their defaults
                    pass
                os.kill(os.getpid(), -code)
                code = 128 - code  # (a signal that did not end us: as the shell would report it)
            sys.exit(code)
    print(f"tether: not using the warm Snakemake runner ({why}); starting a new interpreter", file=sys.stderr)
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *argv])


def _umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _send(sock: socket.socket | _socket.socket, data: bytes, fds: list[int]) -> None:
    message = struct.pack(_HEADER, len(data)) + data
    rights = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
    sent = sock.sendmsg([message], rights)
    if sent < len(message):
        sock.sendall(message[sent:])


def _recv_exactly(sock: socket.socket | _socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        try:
            chunk = sock.recv(n - len(data))
        except OSError:
            return None
        if not chunk:
            return None
        data += chunk
    return data


def ping(path: str, timeout: float = 5.0) -> bool:
    """Whether a runner answers at ``path``."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        _send(sock, marshal.dumps((_PING,)), [])
        return _recv_exactly(sock, _STATUS_SIZE) == struct.pack(_STATUS, 0)
    except OSError:
        return False
    finally:
        sock.close()


# --- worker ------------------------------------------------------------------------------------

#: runners this worker started: key -> (socket path, process); failures: key -> why
_runners: dict[str, tuple[str, subprocess.Popen[bytes]]] = {}
_failed: dict[str, str] = {}


def runtime_dir() -> str:
    """A directory only this user can enter, for the runners' sockets (short: socket paths are
    limited to ~100 bytes). Raises OSError in words if it exists but is not safe."""
    import stat
    import tempfile

    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = os.path.join(base, f"tether-{os.getuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise OSError(f"{path} is not a directory of this user's that only it can enter")
    return path


def client_script(source: str) -> str:
    """The client as an executable script in :func:`runtime_dir` (written once per interpreter
    and text): what a job's command runs as its ``python`` (``$TETHER_PYTHON``)."""
    import hashlib

    digest = hashlib.sha256(f"{sys.executable}\0{source}".encode()).hexdigest()[:16]
    path = os.path.join(runtime_dir(), f"smk-python-{digest}")
    if not os.path.exists(path):
        shebang = f"#!{sys.executable} -IS\n"
        if len(shebang) > 250 or " " in sys.executable:
            raise OSError(f"the interpreter's path cannot be a script's #! line: {sys.executable}")
        temporary = f"{path}.{os.getpid()}"
        with open(temporary, "w") as fh:
            fh.write(shebang + source)
        os.chmod(temporary, 0o700)
        os.replace(temporary, path)
    return path


def ensure_runner(source: str, key: str, timeout: float = 120.0) -> tuple[str | None, str | None]:
    """The socket of this worker's runner for ``key``, started if needed: ``(path, None)``, or
    ``(None, why)`` when there is none (the job then starts cold, and says why)."""
    import fcntl
    import hashlib
    import socket
    import subprocess

    if not hasattr(os, "fork") or not hasattr(os, "pidfd_open") or not hasattr(socket, "AF_UNIX"):
        return None, "this system has no fork/pidfd_open (Linux 5.3 or later is needed)"
    if key in _failed:
        return None, _failed[key]
    digest = hashlib.sha256(f"{sys.executable}\0{key}".encode()).hexdigest()[:16]
    try:
        directory = runtime_dir()
    except OSError as exc:
        return None, str(exc)
    path = os.path.join(directory, f"smk-{os.getpid()}-{digest}.sock")
    known = _runners.get(key)
    if known is not None and known[0] == path and known[1].poll() is None:
        return path, None  # alive: no need to ask (if it ends meanwhile, the job's client starts cold)
    with open(os.path.join(directory, f"smk-{os.getpid()}-{digest}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # threads of a thread engine: one starts it
        if ping(path):
            return path, None
        life_r, life_w = os.pipe()  # the worker keeps life_w open for good: the runner's lifeline
        try:
            proc = subprocess.Popen(
                [sys.executable, client_script(source), "serve", path], stdin=life_r, stdout=subprocess.PIPE,
                start_new_session=True, close_fds=True, cwd=directory)
        except OSError as exc:  # the script could not be written, or run
            os.close(life_w)
            return None, f"cannot start it: {exc}"
        finally:
            os.close(life_r)
        assert proc.stdout is not None
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            line = proc.stdout.readline().decode(errors="replace").strip() if sel.select(timeout) else ""
        proc.stdout.close()
        if line != "ready":
            os.close(life_w)
            proc.kill()
            proc.wait()
            why = line.removeprefix("error: ") if line else f"it did not start within {timeout:g} s"
            _failed[key] = f"it could not start: {why}"
            return None, _failed[key]
        _runners[key] = (path, proc)
        return path, None


def run_in_runner(path: str, argv: list[str], env: dict[str, str], cwd: str, fds: list[int],
                  walltime: float | None) -> tuple[int, bool]:
    """What the client does, from the worker itself (no shell, no client interpreter): run
    ``python ARGV`` in the runner at ``path`` with ``fds`` as its stdin, stdout and stderr.
    Returns the job's status (-N: killed by signal N) and whether ``walltime`` ran out, in which
    case the runner was told to kill the job (it does: SIGTERM, then SIGKILL) and was awaited.

    Raises OSError when the runner cannot be reached (before anything ran), :class:`RunnerLost`
    when it went away while the job ran. If the worker is killed meanwhile (a cancel), the
    connection closes and the runner kills the job."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        _send(sock, marshal.dumps(("job", argv, env, cwd, _umask())), fds)
        sock.settimeout(walltime)
        timed_out = False
        try:
            status = _recv_exactly_or_timeout(sock, _STATUS_SIZE)
        except TimeoutError:
            timed_out = True
            sock.shutdown(socket.SHUT_WR)  # the runner reads end-of-file: it kills the job's group
            sock.settimeout(KILL_GRACE + 60)
            status = _recv_exactly(sock, _STATUS_SIZE)
        if status is None:
            raise RunnerLost("the warm Snakemake runner ended while the job ran")
        return struct.unpack(_STATUS, status)[0], timed_out


class RunnerLost(Exception):
    """The runner went away while a job ran (not an OSError: the job may have done some work)."""


def _recv_exactly_or_timeout(sock: socket.socket, n: int) -> bytes | None:
    """As :func:`_recv_exactly`, but a timeout is raised, not taken for a closed connection."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


# --- runner ------------------------------------------------------------------------------------


def warm_up() -> None:
    """Import what a job imports, and fill the caches it fills before it does any work.

    Measured with Snakemake 9.27: imports alone left 0.6 s per job (the plugin registries, the
    argument parser, the report and storage modules, the Snakefile tokenizer's expressions);
    with these, a trivial job's fork runs in ~60 ms.
    """
    import io
    import threading
    import tokenize

    import snakemake.cli

    snakemake.cli.get_argument_parser()  # collects every plugin registry
    import snakemake.api  # noqa: F401
    import snakemake.dag  # noqa: F401
    import snakemake.executors.local  # noqa: F401
    import snakemake.persistence  # noqa: F401
    import snakemake.report  # noqa: F401
    import snakemake.workflow  # noqa: F401

    for optional in ("snakemake.scheduling.job_scheduler", "snakemake.scheduling.milp", "pulp",
                     "smart_open", "yte"):
        try:
            __import__(optional)
        except ImportError:
            pass
    list(tokenize.generate_tokens(io.StringIO("x = 1\n").readline))
    assert threading.active_count() == 1, "warming up started a thread: forking would copy it half-done"


class _Job:
    """A job the runner started: its client's connection and its process."""

    __slots__ = ("conn", "pid", "pidfd", "kill_at")

    def __init__(self, conn: socket.socket, pid: int, pidfd: int):
        self.conn, self.pid, self.pidfd = conn, pid, pidfd
        self.kill_at: float | None = None


def serve(path: str) -> None:
    """The runner's main: warm up, say "ready" on stdout, serve jobs until stdin ends or idle."""
    import gc
    import selectors
    import signal
    import socket
    import time

    try:
        warm_up()
    except BaseException as exc:  # noqa: BLE001 - reported to the worker, which starts jobs cold
        print(f"error: warming up failed: {type(exc).__name__}: {exc}", flush=True)
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    listener.setblocking(False)
    gc.freeze()  # what warming up built stays out of the collector: children share its pages
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "lifeline")
    pending: dict[socket.socket, tuple[bytearray, list[int]]] = {}
    jobs: dict[socket.socket, _Job] = {}
    idle_since = time.monotonic()
    print("ready", flush=True)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the worker reads no more of it
    signal.signal(signal.SIGTERM, _end_on_sigterm)  # end as below: jobs killed, files removed

    def finish(job: _Job, status: int | None) -> None:
        sel.unregister(job.pidfd)
        os.close(job.pidfd)
        jobs.pop(job.conn, None)
        if status is not None:
            try:
                job.conn.sendall(struct.pack(_STATUS, status))
            except OSError:
                pass
        try:
            sel.unregister(job.conn)
        except (KeyError, ValueError):
            pass
        job.conn.close()

    def drop(conn: socket.socket) -> None:
        _, fds = pending.pop(conn, (None, []))
        for fd in fds:
            os.close(fd)
        sel.unregister(conn)
        conn.close()

    try:
        while True:
            now = time.monotonic()
            deadlines = [j.kill_at for j in jobs.values() if j.kill_at is not None]
            if not jobs and not pending:
                deadlines.append(idle_since + IDLE_SECONDS)
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            events = sel.select(timeout)
            now = time.monotonic()
            for job in list(jobs.values()):
                if job.kill_at is not None and job.kill_at <= now:
                    _kill_group(job.pid, signal.SIGKILL)
                    job.kill_at = None
            if not events and not jobs and not pending and now - idle_since >= IDLE_SECONDS:
                return
            for key, _ in events:
                what = key.data
                if what == "lifeline":
                    if not os.read(sys.stdin.fileno(), 4096):
                        return  # the worker is gone: so are its jobs (finally, below)
                elif what == "accept":
                    try:
                        conn, _ = listener.accept()
                    except BlockingIOError:
                        continue
                    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                    if struct.unpack("3i", creds)[1] != os.getuid():  # the directory keeps others out too
                        conn.close()
                        continue
                    conn.setblocking(False)
                    pending[conn] = (bytearray(), [])
                    sel.register(conn, selectors.EVENT_READ, "request")
                elif what == "request":
                    conn = key.fileobj
                    request = _read_request(conn, *pending[conn])
                    if request is False:
                        drop(conn)
                    elif request is not None:
                        _, fds = pending.pop(conn)
                        sel.unregister(conn)
                        idle_since = now
                        if request[0] == _PING:
                            conn.setblocking(True)
                            conn.sendall(struct.pack(_STATUS, 0))
                            conn.close()
                            for fd in fds:
                                os.close(fd)
                            continue
                        job = _start(request, fds, conn)
                        for fd in fds:
                            os.close(fd)
                        if job is None:
                            conn.close()
                            continue
                        jobs[conn] = job
                        sel.register(job.pidfd, selectors.EVENT_READ, job)
                        sel.register(conn, selectors.EVENT_READ, ("client", job))
                elif isinstance(what, _Job):  # a job ended
                    _, wait_status = os.waitpid(what.pid, 0)
                    finish(what, os.waitstatus_to_exitcode(wait_status))
                    idle_since = now
                elif isinstance(what, tuple):  # the client spoke or went away: it never speaks
                    job = what[1]
                    try:
                        gone = not job.conn.recv(1)
                    except BlockingIOError:
                        gone = False
                    except OSError:
                        gone = True
                    if gone:
                        sel.unregister(job.conn)
                        _kill_group(job.pid, signal.SIGTERM)
                        job.kill_at = now + KILL_GRACE
    finally:
        for job in jobs.values():
            _kill_group(job.pid, signal.SIGKILL)
        for name in (path, path.removesuffix(".sock") + ".lock"):
            try:
                os.unlink(name)
            except OSError:
                pass


def _end_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _read_request(conn: socket.socket, buf: bytearray, fds: list[int]) -> tuple | bool | None:
    """Read what has arrived: the request when complete, None for more to come, False if broken."""
    import array
    import socket

    try:
        data, ancillary, _, _ = conn.recvmsg(1 << 16, socket.CMSG_SPACE(16 * array.array("i").itemsize))
    except BlockingIOError:
        return None
    except OSError:
        return False
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
            fds.extend(got)
    if not data:
        return False
    buf += data
    if len(buf) < _HEADER_SIZE:
        return None
    (size,) = struct.unpack_from(_HEADER, buf)
    if len(buf) < _HEADER_SIZE + size:
        return None
    try:
        request = marshal.loads(bytes(buf[_HEADER_SIZE:_HEADER_SIZE + size]))
    except (EOFError, ValueError, TypeError):
        return False
    return request if isinstance(request, tuple) and request else False


def _start(request: tuple, fds: list[int], conn: socket.socket) -> _Job | None:
    """Fork the job's process; None if the request is malformed."""
    if len(request) != 5 or request[0] != "job" or len(fds) != 3:
        return None
    _, argv, env, cwd, umask = request
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            _become_job(argv, env, cwd, umask, fds)
        finally:
            os._exit(70)  # not reached: _become_job exits
    return _Job(conn, pid, os.pidfd_open(pid))


def _become_job(argv: list[str], env: dict[str, str], cwd: str, umask: int, fds: list[int]) -> None:
    """In the fork: become ``python -c CODE ARGS`` as the client's interpreter would have been."""
    import atexit
    import builtins
    import signal
    import threading
    import traceback

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the runner's handler is not the job's
    os.setsid()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    os.closerange(3, 1 << 16)  # the listener, other clients, the lifeline, pidfds
    code = 0
    try:
        os.chdir(cwd)
        os.umask(umask)
        os.environ.clear()
        os.environ.update(env)
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
        if env.get("PYTHONUNBUFFERED"):
            sys.stdout.reconfigure(write_through=True)
        sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")  # noqa: SIM115
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.argv = ["-c", *argv[1:]]
        sys.path[0] = ""
        namespace = {"__name__": "__main__", "__builtins__": builtins}
        exec(compile(argv[0], "<string>", "exec"), namespace)  # noqa: S102 - the job's own -c code
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException:  # noqa: BLE001 - as the interpreter reports an uncaught exception
        traceback.print_exc()
        code = 1
    try:
        threading._shutdown()  # type: ignore[attr-defined]  # non-daemon threads, as at a normal exit
    except Exception:  # noqa: BLE001
        pass
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


def _exit_code(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


if __name__ == "__main__":  # run as the script client_script() writes
    if sys.argv[1:2] == ["serve"]:  # python SCRIPT serve PATH: the runner
        serve(sys.argv[2])
    else:  # SCRIPT -c CODE ARGS: a job's python
        client(sys.argv[1:])
