"""What a newcomer did, and what went wrong for them (issue 18): each test repeats it against a
real service and endpoint and asserts what they see now."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from tether import Executor, SerializationError, ServiceUnreachable, TaskFailed
from tether.local import LocalStack

import helpers
from conftest import wait_for

# the functions below travel by value, as those of a user's script do (the endpoint cannot import this module)
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def tether(stack: LocalStack, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tether.cli", *args], env=stack.env, capture_output=True, text=True,
                          timeout=timeout)


def said(out: subprocess.CompletedProcess) -> str:
    return " ".join((out.stdout + out.stderr).split())  # rich wraps lines


def test_a_second_endpoint_or_service_beside_a_running_one_is_refused(fresh_stack: LocalStack) -> None:
    stack = fresh_stack
    pid = stack.endpoint_pid()
    out = tether(stack, "endpoint", "start", stack.endpoint_name, timeout=30)  # in the foreground, as typed
    assert out.returncode == 1 and f"endpoint '{stack.endpoint_name}' is already running (pid {pid})" in said(out)
    out = tether(stack, "service", "start", "--detach")
    assert out.returncode == 1 and f"a service is already running from {stack.home}" in said(out)
    assert f"(pid {stack.service_pid()}, {stack.service_url})" in said(out)
    # both originals serve on, untouched
    assert stack.endpoint_pid() == pid
    with Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token) as ex:
        assert ex.submit(helpers.square, 4).result(timeout=60) == 16


def test_commands_fail_in_words_without_a_traceback(tmp_path: Path, stack: LocalStack) -> None:
    nowhere = LocalStack(home=tmp_path, env={**stack.env, "TETHER_HOME": str(tmp_path)})
    out = tether(nowhere, "whoami")
    assert out.returncode == 1 and "no Tether service configured" in said(out) and "Traceback" not in said(out)
    out = tether(nowhere, "endpoint", "stop", "nosuch")
    assert out.returncode == 1 and "no endpoint named 'nosuch'" in said(out)
    out = tether(stack, "--version")
    assert out.returncode == 0 and out.stdout.startswith("tether ")
    out = tether(stack, "endpoint", "status", stack.endpoint_id)  # by id, not only by name
    assert out.returncode == 0 and stack.endpoint_id in said(out) and "online" in said(out)
    out = tether(stack, "endpoint", "list", "--help")
    assert out.returncode == 0 and "<bool>" not in out.stdout and "--json" in out.stdout


def test_waiting_on_a_stopped_service_says_why_and_ends(fresh_stack: LocalStack) -> None:
    stack = fresh_stack
    stack.stop_service()
    started = time.monotonic()
    with Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token,
                  service_timeout=5) as ex:
        fut = ex.submit(helpers.square, 3)
        with pytest.raises(TimeoutError, match="has not been reachable for"):
            fut.result(timeout=1)
    assert time.monotonic() - started < 30  # leaving the block no longer hangs
    with pytest.raises(ServiceUnreachable, match=r"reload\(\) returns their futures"):
        fut.result()


def test_tasks_of_a_stopped_endpoint_say_they_wait_for_it(fresh_stack: LocalStack) -> None:
    stack = fresh_stack
    with Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token) as ex:
        fut = ex.submit(helpers.sleep_then, 2, "done")
        wait_for(lambda: fut.state == "running", what="the task to run")
        stack.stop_endpoint()
        wait_for(lambda: fut.state == "waiting-for-endpoint", what="the future to say it waits for its endpoint")
        assert "running" not in fut.transitions
        stack.start_endpoint()
        assert fut.result(timeout=60) == "done"  # run again when the endpoint is back


def locked() -> object:
    import threading

    return threading.Lock()


def missing_key() -> int:
    table = {"a": 1}
    return table["b"]


def test_errors_name_what_failed_and_where(executor: Executor) -> None:
    with pytest.raises(SerializationError, match="A task's return value must be picklable"):
        executor.submit(locked).result(timeout=60)
    with pytest.raises(KeyError) as info:
        executor.submit(missing_key).result(timeout=60)
    exc = info.value
    assert isinstance(exc, TaskFailed) and exc.args == ("b",) and repr(exc) == "KeyError('b')"
    assert str(exc).startswith("'b'\n")  # printed uncaught: "KeyError: 'b'", as it would be locally
    assert type(exc).__module__ == "builtins"
    # the remote frame names this file, line and source, not "<dynamic-code>"
    assert f'File "{__file__}"' in exc.remote_traceback and 'return table["b"]' in exc.remote_traceback
    assert "<dynamic-code>" not in exc.remote_traceback
