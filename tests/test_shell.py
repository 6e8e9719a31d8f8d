"""ShellFunction against a real service and endpoint: streams, exit codes, walltime, templates,
check=True, the sandbox, and that cancelling (or losing) the task kills the command's processes."""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path

import pytest

from tether import (
    Executor,
    ShellCommandFailed,
    ShellFunction,
    ShellResult,
    TaskCancelled,
    TaskFailed,
    TetherError,
)
from tether.local import local_stack
from tether.protocol import TaskState
from tether.shell import ShellTemplateError, _tail

from conftest import pid_alive, wait_for

#: starts a background sleep, publishes its pid atomically, waits for it
SLEEPER = ShellFunction("sleep 300 & echo $! > {p}.tmp; mv {p}.tmp {p}; wait")


def test_stdout_stderr_and_exit_code(executor: Executor) -> None:
    fn = ShellFunction("echo {x}; echo oops >&2; exit 3", walltime=60)
    r = executor.submit(fn, x=42).result(timeout=30)
    assert isinstance(r, ShellResult)
    assert (r.returncode, r.stdout, r.stderr) == (3, "42\n", "oops\n")
    assert r.cmd == "echo 42; echo oops >&2; exit 3"
    assert r.exception_name == "subprocess.CalledProcessError"

    ok = executor.submit(ShellFunction("printf 'a b\\nc'")).result(timeout=30)
    assert (ok.returncode, ok.stdout, ok.stderr, ok.exception_name) == (0, "a b\nc", "", None)


def test_walltime_kills_the_whole_process_group(executor: Executor, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    # a child of the shell (not exec'd) and a grandchild: both must die
    cmd = "sleep 100 & echo $! > {pidfile}.1; bash -c 'sleep 100 & echo $! > {pidfile}.2; wait'; wait"
    started = time.monotonic()
    r = executor.submit(ShellFunction(cmd, walltime=1), pidfile=str(pidfile)).result(timeout=30)
    elapsed = time.monotonic() - started
    assert r.returncode == 124
    assert r.exception_name == "subprocess.TimeoutExpired"
    assert elapsed < 10, f"walltime of 1 s took {elapsed:.1f} s"
    for suffix in (".1", ".2"):
        pid = int(Path(f"{pidfile}{suffix}").read_text())
        wait_for(lambda pid=pid: not pid_alive(pid), timeout=10, what=f"sleep {pid} to die")


def test_walltime_escalates_to_sigkill(executor: Executor, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    r = executor.submit(ShellFunction("trap '' TERM; echo $$ > {p}; exec sleep 100", walltime=0.5),
                        p=str(pidfile)).result(timeout=30)
    assert r.returncode == 124
    pid = int(pidfile.read_text())
    wait_for(lambda: not pid_alive(pid), timeout=10, what="the TERM-ignoring command to be killed")


def test_missing_template_key_fails_at_submit(executor: Executor) -> None:
    fn = ShellFunction("cp {src} {dst}")
    with pytest.raises(KeyError) as info:
        executor.submit(fn, src="a", other="b")
    assert isinstance(info.value, TetherError) and isinstance(info.value, ShellTemplateError)
    text = str(info.value)
    assert "dst" in text and "given: other, src" in text

    with pytest.raises(ShellTemplateError, match="keyword arguments only"):
        executor.submit(fn, "a", "b")


def test_malformed_template_is_an_error_at_construction() -> None:
    with pytest.raises(ValueError, match=r"\{\{"):
        ShellFunction("for i in {1..3}; do echo $i; done")
    with pytest.raises(ValueError, match="walltime"):
        ShellFunction("true", walltime=0)
    # doubled braces are literal
    assert ShellFunction("echo ${{HOME}} {x}").format((), {"x": 1}) == "echo ${HOME} 1"


def test_check_true_failure_shows_returncode_and_stderr_tail(executor: Executor) -> None:
    fn = ShellFunction("echo fine; for i in $(seq 1 50); do echo line$i >&2; done; exit 7", check=True)
    fut = executor.submit(fn)
    with pytest.raises(ShellCommandFailed) as info:
        fut.result(timeout=30)
    exc = info.value
    assert isinstance(exc, TaskFailed)
    text = str(exc)
    assert "returncode 7" in text
    assert "line50" in text and "line31" in text and "line30\n" not in text  # the last 20 lines
    assert fut.state == TaskState.FAILED
    assert exc.returncode == 7 and exc.result.stdout == "fine\n"  # the remote exception's fields survive

    # check=True and success: a plain result
    assert executor.submit(ShellFunction("true", check=True)).result(timeout=30).returncode == 0


def test_snippet_lines_keeps_the_last_lines(executor: Executor) -> None:
    fn = ShellFunction("seq 1 {n}; seq 1 3 >&2", snippet_lines=10)
    r = executor.submit(fn, n=200000).result(timeout=60)
    assert r.stdout.splitlines() == [str(i) for i in range(199991, 200001)]
    assert r.stderr == "1\n2\n3\n"
    none = executor.submit(ShellFunction("echo hidden", snippet_lines=0)).result(timeout=30)
    assert (none.stdout, none.returncode) == ("", 0)


def test_runs_in_the_task_sandbox_with_task_id(executor: Executor, stack) -> None:
    fn = ShellFunction("pwd; echo $TETHER_TASK_ID; echo $GREETING; touch made-here", env={"GREETING": "hi"})
    fut = executor.submit(fn)
    r = fut.result(timeout=30)
    cwd, task_id, greeting = r.stdout.splitlines()
    assert task_id == fut.task_id
    assert greeting == "hi"
    sandbox = stack.endpoint_dir() / "tasks" / fut.task_id
    assert Path(cwd).resolve() == sandbox.resolve()
    assert (sandbox / "made-here").exists()

    sub = executor.submit(ShellFunction("pwd", cwd="work/dir")).result(timeout=30)
    assert sub.stdout.strip().endswith(os.path.join("work", "dir"))


def test_cancel_kills_the_running_command(executor: Executor, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    fut = executor.submit(SLEEPER, p=str(pidfile))
    wait_for(pidfile.exists, timeout=30, what="the command to start")
    pid = int(pidfile.read_text())
    assert pid_alive(pid)
    assert fut.cancel()
    with pytest.raises(TaskCancelled):
        fut.result(timeout=30)
    wait_for(lambda: not pid_alive(pid), timeout=15, what="the cancelled command's sleep to die")
    # the endpoint still works afterwards
    assert executor.submit(ShellFunction("echo {x}"), x="after").result(timeout=30).stdout == "after\n"


def test_a_killed_daemons_command_runs_on_and_stopping_the_endpoint_kills_it(fresh_stack, tmp_path: Path) -> None:
    """A SIGKILL of the daemon leaves a running command running (its worker says so in
    ``workers/``, for the next daemon to adopt: tests/test_restart.py); ``tether endpoint stop``
    of that next daemon ends it, and the lifeline kills what the command started."""
    pidfile = tmp_path / "pid"
    with Executor(endpoint_id=fresh_stack.endpoint_id, service=fresh_stack.service_url,
                  token=fresh_stack.token) as ex:
        fut = ex.submit(SLEEPER, p=str(pidfile))
        wait_for(pidfile.exists, timeout=30, what="the command to start")
        pid = int(pidfile.read_text())
        fresh_stack.kill_endpoint()  # SIGKILL: the daemon cannot clean up
        workers = fresh_stack.endpoint_dir() / "workers"
        wait_for(lambda: list(workers.glob("*.adopt")), timeout=30, what="the worker to say what it runs")
        assert pid_alive(pid), "a SIGKILL of the daemon killed a running command"
        fresh_stack.start_endpoint()  # adopts it
        fresh_stack.stop_endpoint()  # a real stop: what runs ends
        wait_for(lambda: not pid_alive(pid), timeout=15, what="the command to die with the stop")
        fut.cancel()


def test_thread_engine_runs_shell_functions_in_their_sandbox(tmp_path: Path) -> None:
    with local_stack(tmp_path / "home", engine="thread", workers=2) as s:
        with Executor(endpoint_id=s.endpoint_id, service=s.service_url, token=s.token) as ex:
            futs = [ex.submit(ShellFunction("pwd; echo $TETHER_TASK_ID; exit {i}"), i=i) for i in range(4)]
            for i, fut in enumerate(futs):
                r = fut.result(timeout=30)
                assert r.returncode == i
                cwd, tid = r.stdout.split()
                assert tid == fut.task_id and Path(cwd).name == fut.task_id
            r = ex.submit(ShellFunction("sleep 100", walltime=0.5)).result(timeout=30)
            assert r.returncode == 124


def test_missing_cwd_fails_in_words(executor: Executor, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cannot start the command in .*nowhere"):
        executor.submit(ShellFunction("true", cwd=str(tmp_path / "nowhere"))).result(timeout=30)


def test_same_command_same_function_id() -> None:
    from tether.serialize import function_id, serialize

    a, b = ShellFunction("echo {x}", walltime=5), ShellFunction("echo {x}", walltime=5)
    assert function_id(serialize(a)) == function_id(serialize(b))
    assert function_id(serialize(a)) != function_id(serialize(ShellFunction("echo {x}", walltime=6)))
    assert a.__name__ == "ShellFunction: echo {x}"
    assert ShellFunction("true", name="noop").__name__ == "noop"


def test_called_outside_a_task_runs_in_cwd_and_walltime_check(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    r = ShellFunction("pwd; echo ${{TETHER_TASK_ID:-none}}")()
    assert r.stdout.split() == [str(tmp_path.resolve()), "none"]
    assert list(tmp_path.iterdir()) == []  # capture files removed: the result holds everything
    with pytest.raises(ShellCommandFailed, match="walltime of 0.3 s") as info:
        ShellFunction("echo partial; sleep 30", walltime=0.3, check=True)()
    assert info.value.result.returncode == 124 and info.value.result.stdout == "partial\n"


def test_tail_reads_from_the_end(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"".join(b"%d\n" % i for i in range(100000)))
    assert _tail(str(p), 3, block=7) == ("99997\n99998\n99999\n", True)
    p.write_bytes(b"a\nb")
    assert _tail(str(p), 2) == ("a\nb", False)
    assert _tail(str(p), 1) == ("b", True)
    p.write_bytes(b"")
    assert _tail(str(p), 5) == ("", False)
    p.write_bytes("é\n".encode() * 3)
    assert _tail(str(p), 2, block=3) == ("é\né\n", True)


# --- quoting: template values are shell code unless quoted -----------------------------------
HOSTILE = "a b; echo pwned"


def test_unquoted_values_are_shell_code(executor: Executor) -> None:
    """The default (Globus Compute's): what the quoting tests below guard against, seen happen."""
    r = executor.submit(ShellFunction("echo {x}"), x=HOSTILE).result(timeout=30)
    assert r.stdout.splitlines() == ["a b", "pwned"]


def test_quote_true_passes_every_value_literally(executor: Executor, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    value = f"{HOSTILE}; touch {marker}"
    fn = ShellFunction("echo {x}; echo {y}", quote=True)
    r = executor.submit(fn, x=value, y="$(id) `id` it's \"quoted\" *").result(timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [value, "$(id) `id` it's \"quoted\" *"]
    assert not marker.exists()  # never ran
    assert "pwned" not in r.stdout.replace(value, "")


def test_q_conversion_quotes_one_value(executor: Executor, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    value = f"{HOSTILE}; touch {marker}"
    fn = ShellFunction("echo {x!q} {n}; echo {width!q:>6}")
    r = executor.submit(fn, x=value, n="$((40 + 2))", width="a b").result(timeout=30)
    assert r.returncode == 0, r.stderr
    # x arrives as one literal word; n stays code (expanded); a format spec applies before quoting
    assert r.stdout.splitlines() == [f"{value} 42", "   a b"]
    assert not marker.exists()
    # with quote=True too, a value is quoted once, not twice
    both = executor.submit(ShellFunction("echo {x!q} {y}", quote=True), x=HOSTILE, y=HOSTILE).result(timeout=30)
    assert both.stdout.splitlines() == [f"{HOSTILE} {HOSTILE}"]


def test_quoting_templates_are_checked_at_construction_and_submit(executor: Executor) -> None:
    with pytest.raises(ValueError, match=r"\{x!z\}: the conversion must be !q"):
        ShellFunction("echo {x!z}")
    with pytest.raises(ShellTemplateError, match="needs the keyword argument"):
        executor.submit(ShellFunction("echo {x!q}", quote=True), y=1)
    # !r, !s, !a convert first; quote=True then quotes the result
    assert ShellFunction("echo {x!r} {y}", quote=True).format((), {"x": "a", "y": "b c"}) == \
        f"echo {shlex.quote(repr('a'))} 'b c'"
