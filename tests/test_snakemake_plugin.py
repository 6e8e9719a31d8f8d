"""The Snakemake executor plugin through the real ``snakemake`` CLI and Snakemake's own plugin test
harness, against a real service and two real endpoints (process engine): shell, ``run:`` and
``script:`` rules, threads and resources, a group, an MPI rule with 4 ranks, ``--retries``, a rule
sent to another endpoint, a failing rule and one past its runtime (both reported with their
stderr), Ctrl-C killing the remote job, the no-shared-file-system path through a storage plugin,
and bad input refused in words.

Snakemake finds executor plugins by listing installed packages, so these tests also prove the
plugin is found from the README's editable install.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import psutil
import pytest
from snakemake.common.tests import TestWorkflowsLocalStorageBase
from snakemake_interface_common.exceptions import WorkflowError
from snakemake_interface_executor_plugins.settings import ExecutorSettingsBase

from snakemake_executor_plugin_tether import ExecutorSettings
from snakemake_executor_plugin_tether.endpoints import check_endpoint
from snakemake_executor_plugin_tether.submission import submission_for
from tether import Client
from tether.local import LocalStack, local_stack

from conftest import MPI_MISSING, multi_user_missing, needs_mpi, pid_alive, wait_for
from parsl_stack import blind_endpoint_missing, endpoint_blind_to

WORKFLOWS = Path(__file__).parent / "snakemake"



class SnakeStack:
    """A service, a 4-worker endpoint and a 1-worker second endpoint, and how to run snakemake at them."""

    def __init__(self, stack: LocalStack, second_id: str):
        self.stack = stack
        self.endpoint_id = stack.endpoint_id
        self.second_id = second_id
        self.env = dict(stack.env, TETHER_SERVICE_URL=stack.service_url, TETHER_TOKEN=stack.token)

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "snakemake", "--executor", "tether", "--tether-endpoint-id",
                self.endpoint_id, *args]

    def run(self, workdir: Path, *args: str, timeout: float = 100) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*args), cwd=workdir, env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def client(self) -> Client:
        return Client(service=self.stack.service_url, token=self.stack.token)


@pytest.fixture(scope="module")
def snake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SnakeStack]:
    with local_stack(tmp_path_factory.mktemp("snakehome"), engine="process", workers=4) as stack:
        stack.configure_endpoint("process", 1, name="second")
        try:
            yield SnakeStack(stack, stack.start_endpoint("second"))
        finally:
            stack.stop_endpoint("second")


def _workflow(name: str, tmp_path: Path) -> Path:
    workdir = tmp_path / name
    shutil.copytree(WORKFLOWS / name, workdir)
    return workdir


def test_snakemake_finds_the_plugin(snake: SnakeStack) -> None:
    """An editable install is invisible to Snakemake's plugin listing unless we make it visible."""
    out = subprocess.run([sys.executable, "-m", "snakemake", "--help"], capture_output=True, text=True,
                         timeout=60, env=snake.env)
    assert out.returncode == 0, out.stderr
    assert "--tether-endpoint-id" in out.stdout
    assert "SNAKEMAKE_TETHER_ENDPOINT_ID" in out.stdout


@pytest.mark.slow
@needs_mpi
@pytest.mark.timeout(240)
def test_issue_workflow(snake: SnakeStack, tmp_path: Path) -> None:
    """Every kind of rule the issue names, in one run (the runtime=1 rule makes it last a minute)."""
    wf = _workflow("workflow", tmp_path)
    out = snake.run(wf, "all", "fails.txt", "too_slow.txt", "--jobs", "6", "--retries", "1", "--keep-going",
                    "--config", f"second_endpoint={snake.second_id}", timeout=200)
    assert out.returncode == 1, out.stderr  # two rules fail on purpose; everything else is made

    shell = (wf / "shell.txt").read_text().splitlines()
    assert shell[0] == "hello" and re.fullmatch(r"task=[0-9a-f-]{36}", shell[1]), shell
    assert (wf / "run.txt").read_text().startswith("HELLO\nTASK=")
    assert (wf / "script.txt").read_text() == "2 lines, threads=1\n"
    threads, mem_mb, runtime = (wf / "threads.txt").read_text().split()
    assert (int(threads), mem_mb, runtime) == (min(2, os.cpu_count() or 1), "100", "5")
    assert sorted((wf / "ring.txt").read_text().split()) == ["0", "1", "2", "3"]  # 4 MPI ranks
    grouped = (wf / "grouped/b.txt").read_text().split("\n")
    assert grouped[0].split()[0] == "a" and grouped[1].split()[0] == "b"
    assert grouped[0].split()[1] == grouped[1].split()[1]  # the group ran as one task
    assert (wf / "flaky.txt").read_text() == "ok\n"  # failed once, retried
    assert f"endpoints{os.sep}second{os.sep}" in (wf / "second.txt").read_text()

    err = out.stderr
    assert "Error in rule fails" in err and "The job exited with code 1 on Tether endpoint" in err
    assert "this rule fails on purpose" in err  # the job's stderr tail, in the main output
    assert "Error in rule too_slow" in err and "killed at its walltime of 60 s (resources: runtime=1 min)" in err
    assert not (wf / "fails.txt").exists() and not (wf / "too_slow.txt").exists()
    logs = re.findall(r"log: (\.snakemake/tether_logs/rule_fails/\S+\.log)", err)
    assert logs and "this rule fails on purpose" in (wf / logs[0]).read_text()


def test_jobs_start_warm_and_share_nothing(snake: SnakeStack, tmp_path: Path) -> None:
    """Both jobs start in forks of one warm runner (not a new interpreter each), and the second sees
    nothing the first left in its process; --tether-cold-start gives the same outputs, cold."""
    wf = _workflow("warm", tmp_path)
    # one at a time: both go to the same (first idle) worker. --envvars puts an export in the job's
    # command, so it runs in bash, with the runner's client as its python (the other tests' jobs run
    # in the runner straight from the worker)
    out = subprocess.run(snake.command("--jobs", "1", "--envvars", "TETHER_SNAKE_VAR"), cwd=wf, capture_output=True,
                         env=dict(snake.env, TETHER_SNAKE_VAR="carried"), text=True, timeout=100,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    first_parent, first_cmdline, variable = (wf / "first.txt").read_text().splitlines()
    assert variable == "carried"
    second_parent, left_behind = (wf / "second.txt").read_text().splitlines()
    assert " serve " in first_cmdline and "smk-python-" in first_cmdline, first_cmdline  # the runner
    assert first_parent == second_parent  # the same runner started both...
    assert left_behind == "[None, None]"  # ...and the second saw nothing of the first
    assert "not using the warm Snakemake runner" not in out.stderr

    cold = _workflow("warm", tmp_path / "cold")
    out = snake.run(cold, "--jobs", "1", "--tether-cold-start")
    assert out.returncode == 0, out.stderr
    assert "/bin/bash" in (cold / "first.txt").read_text().splitlines()[1]  # started by the job's shell
    assert (cold / "first.txt").read_text().splitlines()[2] == "None"  # not given: not there
    assert (cold / "second.txt").read_text().splitlines()[1] == "[None, None]"


def test_ctrl_c_cancels_remote_jobs(snake: SnakeStack, tmp_path: Path) -> None:
    wf = _workflow("workflow", tmp_path)
    pidfile = wf / "sleeper.pid"
    proc = subprocess.Popen(snake.command("--jobs", "1", "sleeper.txt"), cwd=wf, env=snake.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 60, "the remote job to start")
        remote_pid = int(pidfile.read_text())
        assert pid_alive(remote_pid)
        # the job runs in a fork of the warm runner (the fork keeps the runner's command line)
        ancestors = [" ".join(p.cmdline()) for p in psutil.Process(remote_pid).parents()[:3]]
        assert any(" serve " in line for line in ancestors), ancestors
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "Terminating processes on user request" in err and "Tether: cancelled 1 job(s)" in err
    wait_for(lambda: not pid_alive(remote_pid), 30, "the remote job's process to be killed")
    group = re.search(r"tasks of group ([0-9a-f-]{36})", err).group(1)
    with snake.client() as client:
        assert [t["state"] for t in client.get_task_group(group)] == ["cancelled"]
    assert not (wf / "sleeper.txt").exists()


@pytest.mark.skipif(shutil.which("rsync") is None and not os.environ.get("CI"),
                    reason="rsync not found: snakemake-storage-plugin-fs copies with it (apt-get install rsync)")
def test_no_shared_file_system(snake: SnakeStack, tmp_path: Path) -> None:
    """Jobs run in their task sandboxes; sources, inputs and outputs go through a storage plugin."""
    wf = _workflow("no_shared_fs", tmp_path)
    storage = tmp_path / "storage"
    storage.mkdir()
    out = snake.run(wf, "--jobs", "2", "--shared-fs-usage", "none", "--default-storage-provider", "fs",
                    "--default-storage-prefix", str(storage))
    assert out.returncode == 0, out.stderr
    lines = (storage / "b.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["a", "b"]
    for line in lines:  # each job ran in its own sandbox on the endpoint, not in the workflow directory
        where = line.split(" ran in ")[1]
        assert f"{os.sep}tasks{os.sep}" in where and not where.startswith(str(wf))
    assert not (wf / "a.txt").exists() and not (wf / "b.txt").exists()


#: the 'files' workflow has an MPI rule too where MPI is installed (always in CI)
FILES_MPI = int(MPI_MISSING is None or bool(os.environ.get("CI")))


@pytest.fixture(scope="module")
def files_by_the_local_executor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 'files' workflow as Snakemake's local executor makes it: what the endpoint must match."""
    local = _workflow("files", tmp_path_factory.mktemp("local"))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")  # mpiexec
    made = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "--config", f"origin={local}",
                           f"mpi={FILES_MPI}"], env=env, cwd=local, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert made.returncode == 0, made.stderr
    assert (local / "seen.txt").read_text() == "visible\n"
    return local


@contextlib.contextmanager
def _endpoint_as_another_user(snake: SnakeStack, user: str) -> Iterator[str]:
    """An endpoint on the stack's service run by POSIX user ``user`` (made if missing), with a
    TETHER_HOME of its own: it cannot enter root's 0700 directories, the workflow's among them."""
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", user], check=True, timeout=60)
        account = pwd.getpwnam(user)
    home = Path(tempfile.mkdtemp(prefix="tether-snake-other-"))
    shutil.copy(snake.stack.home / "service.json", home / "service.json")
    for path in (home, home / "service.json"):
        os.chown(path, account.pw_uid, account.pw_gid)
    env = dict(snake.stack.env, TETHER_HOME=str(home), HOME=account.pw_dir, USER=user, LOGNAME=user)

    def cli(*args: str) -> str:
        out = subprocess.run(["runuser", "-u", user, "--", sys.executable, "-m", "tether.cli", *args], env=env,
                             capture_output=True, text=True, timeout=120, cwd=home)
        assert out.returncode == 0, f"{args}: {out.stdout}\n{out.stderr}"
        return out.stdout

    cli("endpoint", "configure", "other", "--engine", "process", "--workers", "2")
    endpoint_id = cli("endpoint", "start", "other", "--detach").strip().splitlines()[-1].strip()
    try:
        yield endpoint_id
    finally:
        cli("endpoint", "stop", "other")
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("isolation", ["another POSIX user", "a mount namespace"])
def test_files_travel_to_an_endpoint_that_cannot_see_them(snake: SnakeStack, isolation: str,
                                                          files_by_the_local_executor: Path,
                                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    """No shared file system and no storage: the endpoint cannot see the workflow directory (it runs
    as another POSIX user, for whom the directory is mode 0700; or where an empty tmpfs covers the
    directory); inputs go there and outputs come back through the service, byte-identical to the
    local executor's; a second run does nothing."""
    missing = multi_user_missing() if isolation == "another POSIX user" else blind_endpoint_missing()
    if missing and not os.environ.get("CI"):
        pytest.skip(missing)
    laptop = tmp_path_factory.mktemp("laptop")
    wf = _workflow("files", laptop)
    wf.chmod(0o700)
    local = files_by_the_local_executor
    if isolation == "another POSIX user":
        endpoint = _endpoint_as_another_user(snake, "tether_snake")
    else:
        endpoint = endpoint_blind_to(snake.stack, "blind", laptop)
    with endpoint as endpoint_id:
        cmd = snake.command("--jobs", "4", "--shared-fs-usage", "none", "--config", f"origin={wf}", f"mpi={FILES_MPI}")
        cmd[cmd.index("--tether-endpoint-id") + 1] = endpoint_id
        out = subprocess.run(cmd, cwd=wf, env=snake.env, capture_output=True, text=True, timeout=120,
                             stdin=subprocess.DEVNULL)
        assert out.returncode == 0, out.stderr
        assert (wf / "seen.txt").read_text() == "hidden\n"  # the jobs could not see the workflow directory
        given = {p.relative_to(WORKFLOWS / "files") for p in (WORKFLOWS / "files").rglob("*")}
        outputs = sorted(name for p in local.rglob("*") if p.is_file() and (name := p.relative_to(local)) not in given
                         and name.parts[0] not in (".snakemake", "benchmarks") and name.name != "seen.txt")
        assert len(outputs) == 9 + FILES_MPI, outputs  # outputs and logs (a benchmark's times differ)
        for name in outputs:
            assert (wf / name).read_bytes() == (local / name).read_bytes(), name
        assert (wf / "benchmarks/stats.tsv").read_text().startswith("s\th:m:s")  # the benchmark came back
        moved = re.search(r"Tether: moved (\d+) file\(s\), .* to endpoints and (\d+) file\(s\)", out.stderr)
        assert moved and int(moved.group(2)) == len(outputs) + 2, out.stderr[-2000:]  # + seen.txt, the benchmark

        again = subprocess.run(cmd, cwd=wf, env=snake.env, capture_output=True, text=True, timeout=120,
                               stdin=subprocess.DEVNULL)
        assert again.returncode == 0, again.stderr
        assert "Nothing to be done" in again.stderr


def test_unknown_endpoint_is_refused_before_any_job(snake: SnakeStack, tmp_path: Path) -> None:
    wf = _workflow("workflow", tmp_path)
    cmd = snake.command("--jobs", "1", "shell.txt")
    cmd[cmd.index("--tether-endpoint-id") + 1] = "00000000-0000-0000-0000-000000000000"
    out = subprocess.run(cmd, cwd=wf, env=snake.env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "Tether endpoint 00000000-0000-0000-0000-000000000000 does not exist" in out.stderr
    assert not (wf / "shell.txt").exists()


def test_unsatisfiable_mpi_request_fails_in_words(snake: SnakeStack, tmp_path: Path) -> None:
    """Two nodes from a one-host endpoint: the endpoint refuses, the rule fails with its reason."""
    wf = _workflow("workflow", tmp_path)
    out = snake.run(wf, "ring.txt", "--jobs", "1", "--set-resources", "ring:nodes=2")
    assert out.returncode != 0
    assert "Error in rule ring" in out.stderr
    assert "asks for num_nodes=2" in out.stderr and "this host only" in out.stderr


@pytest.mark.parametrize(("resources", "message"), [
    ({"tasks": 0}, "resources tasks=0 must be a positive integer (the number of MPI ranks)"),
    ({"tasks": "many"}, "resources tasks='many' must be a positive integer"),
    ({"tasks": 5, "nodes": 2, "tasks_per_node": 2}, "cannot be satisfied: resource_specification: num_ranks=5"),
    ({"runtime": -1}, "resources runtime=-1 must be a positive number of minutes"),
    ({"tether_user_endpoint_config": "{nope"}, "tether_user_endpoint_config is not valid JSON"),
    ({"tether_user_endpoint_config": "[1]"}, "must be a JSON object"),
    ({"tether_environment": "{nope"}, "tether_environment ('match' or a JSON object) is not valid JSON"),
    ({"tether_environment": "[1]"}, "tether_environment ('match' or a JSON object) must be a JSON object such as"),
    ({"tether_environment": '{"python": "3.9"}'}, "asks for Python 3.9, but this Snakemake runs on Python 3."),
    ({"tether_environment": '{"requirements": ["x @ https://example.org/x.whl"]}'}, "installer options are not"),
])
def test_bad_resources_are_errors_in_words(resources: dict, message: str) -> None:
    with pytest.raises(WorkflowError, match=re.escape(message)):
        submission_for("rule r", resources, "some-endpoint", None)


@pytest.mark.parametrize(("args", "argv"), [
    ("-m snakemake --target-jobs 'a:i=1' --cores 'all' --config 'x=$HOME'",
     ["-m", "snakemake", "--target-jobs", "a:i=1", "--cores", "all", "--config", "x=$HOME"]),
    ("-m snakemake --config x=$HOME", None),  # bash would expand it: bash runs it
    ('-m snakemake --config "x y"', None),
    ("-m snakemake --rule a;b", None),
    ("-m snakemake --rule a*", None),
    ("-m snakemake 'unterminated", None),
])
def test_only_commands_bash_would_merely_split_skip_bash(args: str, argv: list[str] | None) -> None:
    from snakemake_executor_plugin_tether.remote import COMMAND_HEAD, _plain_arguments

    assert _plain_arguments(COMMAND_HEAD + args) == argv
    assert _plain_arguments("export X='1' && " + COMMAND_HEAD + args) is None


def test_resources_map_to_a_submission() -> None:
    sub = submission_for("rule r", {"runtime": 90, "tasks": 8, "nodes": 2, "mpi": "mpiexec",
                                    "tether_endpoint_id": "other", "tether_user_endpoint_config": '{"q": "debug"}'},
                         "default", {"q": "normal"})
    assert (sub.endpoint_id, sub.walltime, sub.user_endpoint_config) == ("other", 5400.0, {"q": "debug"})
    assert sub.resource_specification == {"num_ranks": 8, "num_nodes": 2} and sub.mpi
    plain = submission_for("rule r", {"mem_mb": 100, "_cores": 2}, "default", None)
    assert (plain.endpoint_id, plain.walltime, plain.resource_specification) == ("default", None, None)
    assert not plain.mpi
    with pytest.raises(WorkflowError, match="has no Tether endpoint: pass --tether-endpoint-id"):
        submission_for("rule r", {}, None, None)


def test_an_environment_resource_asks_for_this_python_and_this_snakemake() -> None:
    from importlib.metadata import version

    this, pin = f"{sys.version_info[0]}.{sys.version_info[1]}", f"snakemake=={version('snakemake')}"
    matched = submission_for("rule r", {"tether_environment": "match"}, "e", None)
    assert matched.resource_specification == {"environment": {"python": this, "requirements": [pin]}}
    assert not matched.mpi  # an environment alone asks for no MPI variables
    more = submission_for("rule r", {"tether_environment": '{"requirements": ["numpy==1.26.4"]}', "tasks": 2},
                          "e", None)
    assert more.resource_specification == {"num_ranks": 2, "environment": {
        "python": this, "requirements": sorted(["numpy==1.26.4", pin])}} and more.mpi
    own = submission_for("rule r", {"tether_environment": f'{{"python": "{this}", "requirements": '
                                                          f'["Snakemake>=9"]}}'}, "e", None)
    assert own.resource_specification == {"environment": {"python": this, "requirements": ["Snakemake>=9"]}}


def test_snakemake_version_mismatch_is_reported_in_words(snake: SnakeStack) -> None:
    """The endpoint's real report, against a submitting side that would run another Snakemake."""
    with snake.client() as client:
        assert check_endpoint(client, snake.endpoint_id).online
        with pytest.raises(WorkflowError, match=r"runs Snakemake \d+\.\d+\.\d+ but this workflow runs Snakemake "
                                                r"8\.0\.0: a job command written by one"):
            check_endpoint(client, snake.endpoint_id, local_snakemake="8.0.0")


class TestSnakemakeHarness(TestWorkflowsLocalStorageBase):
    """Snakemake's own executor plugin tests (simple and group workflows), in this process."""

    __test__ = True

    @pytest.fixture(autouse=True)
    def _use_stack(self, snake: SnakeStack) -> None:
        self.snake = snake

    def get_executor(self) -> str:
        return "tether"

    def get_executor_settings(self) -> Optional[ExecutorSettingsBase]:  # noqa: UP045 - the harness's signature
        stack = self.snake.stack
        return ExecutorSettings(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token)
