"""Shared fixtures: real service and endpoint processes in a private TETHER_HOME."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import cloudpickle
import psutil
import pytest

from tether import Executor
from tether.local import LocalStack, local_stack

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
import helpers  # noqa: E402  (tests/helpers.py: functions that run on the endpoint)

# the endpoint's workers cannot import the tests package: ship test helpers by value
cloudpickle.register_pickle_by_value(helpers)

# endpoints started by the tests run with PYTHONUNBUFFERED set, as in many container images, so
# the tests see what it does to output (see test_mpi_issue_example)
os.environ["PYTHONUNBUFFERED"] = "1"

# hypothesis keeps its caches in ./.hypothesis by default: never in the checkout
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(Path(tempfile.gettempdir()) / "tether-tests-hypothesis"))

#: a payload limit low enough to test PayloadTooLarge cheaply
TEST_MAX_PAYLOAD = 4 * 1024 * 1024

#: every process this test session starts inherits this marker in its environment (services,
#: endpoints, engine workers, HTEX managers, mpiexec ...), so the session can tell, at its end,
#: which of the processes still alive are its own, on a machine other people share
SESSION_MARKER = "TETHER_TEST_SESSION"
os.environ[SESSION_MARKER] = f"{os.getpid()}-{uuid.uuid4().hex}"


#: helpers Python's multiprocessing starts for the test process itself; they end when it does
_OWN_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def multi_user_missing() -> str | None:
    """Why a multi-user endpoint cannot run here (None if it can): it needs root, and other
    users must be able to run this Python."""
    if os.geteuid() != 0:
        return "needs root (useradd and setuid); run the tests as root, as CI does"
    python = Path(sys.executable).resolve()
    for parent in [*python.parents][::-1]:
        if parent != Path("/") and not os.stat(parent).st_mode & 0o001:
            return (f"{parent} is not traversable by other users, so user endpoints cannot run {python}; "
                    f"`chmod o+x {parent}` (as .ci/run does) or install Tether system-wide")
    return None


def processes_marked(key: str, accept: Callable[[str], bool]) -> list[psutil.Process]:
    """Live processes (not this one) whose environment has ``key`` with a value ``accept`` takes."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            value = proc.environ().get(key)
            if value is not None and accept(value):
                found.append(proc)
        except (psutil.Error, OSError):  # gone meanwhile, or not ours to read
            continue
    return found


def kill_all(procs: list[psutil.Process]) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def _of_an_ended_session(mark: str) -> bool:
    pid = mark.split("-", 1)[0]
    return mark != os.environ[SESSION_MARKER] and pid.isdigit() and not psutil.pid_exists(int(pid))


def pytest_sessionstart(session: pytest.Session) -> None:
    """A session that was killed (SIGKILL, a CI timeout) could not stop what it started: its
    services and endpoints are stopped here, by the next session. SIGTERM and SIGHUP end this
    session as Ctrl-C does, so its fixtures stop what they started."""
    kill_all(processes_marked(SESSION_MARKER, _of_an_ended_session))

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def processes_of_this_session() -> list[psutil.Process]:
    """Live processes (not zombies, not this one, not its own multiprocessing helpers) that
    carry this session's marker."""
    mark = os.environ[SESSION_MARKER]
    found = []
    for proc in processes_marked(SESSION_MARKER, lambda value: value == mark):
        try:
            if proc.ppid() == os.getpid() and any(h in " ".join(proc.cmdline()) for h in _OWN_HELPERS):
                continue
        except psutil.Error:
            continue
        found.append(proc)
    return found


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """Every engine stops every process it started: at the end of the session, no process
    that inherited this session's marker may still run (a few seconds' grace for exits in
    flight). Survivors are reported with their command lines, then killed."""
    yield
    deadline = time.monotonic() + 15
    survivors = processes_of_this_session()
    while survivors and time.monotonic() < deadline:
        time.sleep(0.2)
        survivors = processes_of_this_session()
    if not survivors:
        return
    report = []
    for proc in survivors:
        try:
            report.append(f"pid {proc.pid}: {' '.join(proc.cmdline())[:300]}")
            proc.kill()
        except psutil.Error:
            continue
    if report:
        pytest.fail("processes started by this test session outlived it:\n" + "\n".join(report), pytrace=False)


#: ``TETHER_TEST_DB=postgres``: every stack of the fixtures below keeps its state in a fresh
#: PostgreSQL database instead of SQLite (.ci/run runs the end-to-end tests a second time so)
TEST_DB = os.environ.get("TETHER_TEST_DB", "sqlite")
PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


def tether_cli(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``tether ARGS`` as a user types it; with ``check``, fail the test (with its output) on a non-zero exit."""
    proc = subprocess.run([sys.executable, "-m", "tether.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)
    if check:
        assert proc.returncode == 0, f"tether {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
    return proc


def home_env(home: Path) -> dict[str, str]:
    """This process's environment without any TETHER_ setting, with ``TETHER_HOME=home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env["TETHER_HOME"] = str(home)
    return env


def pg_missing() -> str | None:
    """Why there is no usable PostgreSQL (127.0.0.1:5432, trust auth for postgres), or None."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'tether[postgres]')"
    try:
        psycopg.connect(PG_DSN, connect_timeout=3).close()
    except psycopg.Error as exc:
        return f"no PostgreSQL on 127.0.0.1:5432 with trust auth for user postgres ({str(exc).strip()[:120]})"
    return None


#: outside CI a machine without PostgreSQL skips these tests (saying why); under CI they must run
needs_pg = pytest.mark.skipif(bool(pg_missing()) and not os.environ.get("CI"), reason=str(pg_missing()))


@contextlib.contextmanager
def database_env() -> Iterator[dict[str, str]]:
    """The environment that puts a stack on the test database backend (``TETHER_DB_URL``, which
    the service and every ``tether service`` command of the stack read); a database made and
    dropped here."""
    if TEST_DB != "postgres":
        yield {}
        return
    with pg_database("tether_e2e") as name:
        yield {"TETHER_DB_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"}


@contextlib.contextmanager
def pg_database(prefix: str) -> Iterator[str]:
    """A new, empty PostgreSQL database named ``<prefix>_<random>``, dropped afterwards."""
    import uuid

    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def run_sql(stack: LocalStack, statement: str) -> list[tuple]:
    """Run one SQL statement on a stack's own database, whichever backend it is on (for tests
    that check what was stored, or break it on purpose)."""
    import sqlalchemy

    args = list(stack.service_args)
    default = stack.env.get("TETHER_DB_URL") or f"sqlite:///{stack.home / 'service' / 'tether.db'}"
    url = args[args.index("--db-url") + 1] if "--db-url" in args else default
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.begin() as conn:
            result = conn.execute(sqlalchemy.text(statement))
            return [tuple(r) for r in result] if result.returns_rows else []
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """One service + one process-engine endpoint (2 workers) for the tests that only submit."""
    with database_env() as db, local_stack(tmp_path_factory.mktemp("home"), engine="process", workers=2,
                                           service_args=("--max-payload-bytes", str(TEST_MAX_PAYLOAD)), env=db) as s:
        yield s


@pytest.fixture
def fresh_stack(tmp_path: Path) -> Iterator[LocalStack]:
    """A stack of its own, for tests that kill or reconfigure things."""
    with database_env() as db, local_stack(tmp_path / "home", engine="process", workers=2, env=db) as s:
        yield s


@pytest.fixture
def executor(stack: LocalStack) -> Iterator[Executor]:
    with Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token) as ex:
        yield ex


def _mpi_missing() -> str | None:
    from tether.mpi import MPILauncherNotFound, find_launcher

    try:
        find_launcher("mpiexec")
    except MPILauncherNotFound as exc:
        return f"{exc} (pip install '.[test]' installs the mpich wheel)"
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (pip install '.[test]')"
    return None


# outside CI a machine without MPI skips the MPI tests (saying what is missing); in CI they must run
MPI_MISSING = _mpi_missing()
needs_mpi = pytest.mark.skipif(MPI_MISSING is not None and not os.environ.get("CI"), reason=MPI_MISSING or "")


def wait_for(predicate: Callable[[], object], timeout: float = 30, what: str = "condition") -> object:
    """Poll a condition that no event announces (a file appearing, a process exiting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False
