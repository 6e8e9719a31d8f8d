"""The command line as a user types it, against real processes in a private TETHER_HOME."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tether import Client, Executor, UnknownEndpoint
from tether.local import LocalStack

import helpers
from conftest import pid_alive, wait_for


def tether(env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "tether.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)
    if check:
        assert proc.returncode == 0, f"tether {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
    return proc


def test_service_json_is_private_and_complete(stack: LocalStack) -> None:
    path = stack.home / "service.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    info = json.loads(path.read_text())
    assert info["url"].startswith("http://127.0.0.1:") and len(info["token"]) >= 32
    cred = stack.endpoint_dir() / "credential.json"
    assert stat.S_IMODE(cred.stat().st_mode) == 0o600
    assert json.loads(cred.read_text())["secret"] != info["token"]  # the endpoint has its own credential


def test_client_finds_service_from_environment_or_home(stack: LocalStack) -> None:
    script = (f"from tether import Executor\n"
              f"print(Executor(endpoint_id={stack.endpoint_id!r}).submit(pow, 3, 3).result(timeout=30))")
    env = dict(stack.env)  # TETHER_HOME only: service.json is found there
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "27", out.stderr
    env = {k: v for k, v in stack.env.items() if k != "TETHER_HOME"}
    env.update(TETHER_SERVICE_URL=stack.service_url, TETHER_TOKEN=stack.token, HOME=str(stack.home / "nohome"))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "27", out.stderr


def test_no_service_configured_is_explained(tmp_path: Path) -> None:
    env = {**os.environ, "TETHER_HOME": str(tmp_path)}
    env.pop("TETHER_SERVICE_URL", None)
    out = subprocess.run([sys.executable, "-c", "from tether import Executor; Executor('x')"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "tether service start" in out.stderr and "TETHER_SERVICE_URL" in out.stderr


def test_endpoint_list_and_status(stack: LocalStack) -> None:
    rows = json.loads(tether(stack.env, "endpoint", "list", "--json").stdout)
    [row] = [r for r in rows if r["name"] == stack.endpoint_name]
    assert row["endpoint_id"] == stack.endpoint_id and row["state"] == "connected" and row["engine"] == "process"
    status = json.loads(tether(stack.env, "endpoint", "status", stack.endpoint_name, "--json").stdout)
    assert status["running"] and status["service"]["online"]
    cap = status["service"]["status"]["capacity"]
    assert cap["workers_total"] == 2 and cap["engine"] == "process"
    versions = status["service"]["status"]["versions"]
    assert versions["python"] == f"{sys.version_info.major}.{sys.version_info.minor}" and "tether" in versions
    table = tether(stack.env, "endpoint", "status", stack.endpoint_name).stdout
    assert "online" in table and "workers total" in table


def test_endpoint_lifecycle_stop_restart_delete(fresh_stack: LocalStack) -> None:
    env = fresh_stack.env
    pid = fresh_stack.endpoint_pid()
    out = tether(env, "endpoint", "stop", fresh_stack.endpoint_name).stdout
    assert "stopped" in out
    wait_for(lambda: not pid_alive(pid), what="the endpoint daemon to exit")
    client = Client(fresh_stack.service_url, fresh_stack.token)
    wait_for(lambda: not client.get_endpoint(fresh_stack.endpoint_id)["online"], what="the service to see it offline")
    out = tether(env, "endpoint", "restart", fresh_stack.endpoint_name).stdout
    assert fresh_stack.endpoint_id in out  # same identity after a restart
    with Executor(endpoint_id=fresh_stack.endpoint_id, service=fresh_stack.service_url, token=fresh_stack.token) as ex:
        assert ex.submit(helpers.square, 6).result(timeout=30) == 36
    tether(env, "endpoint", "delete", fresh_stack.endpoint_name, "--yes")
    assert not fresh_stack.endpoint_dir().exists()
    with pytest.raises(UnknownEndpoint):
        client.get_endpoint(fresh_stack.endpoint_id)
    out = tether(env, "endpoint", "status", "nope", check=False)
    assert out.returncode != 0 and "no endpoint named 'nope'" in out.stderr


def test_endpoint_stop_from_the_service(fresh_stack: LocalStack) -> None:
    pid = fresh_stack.endpoint_pid()
    Client(fresh_stack.service_url, fresh_stack.token).stop_endpoint(fresh_stack.endpoint_id)
    wait_for(lambda: not pid_alive(pid), what="the endpoint to stop when the service asks")


def test_users_see_only_their_own_work(stack: LocalStack, executor: Executor) -> None:
    fut = executor.submit(helpers.square, 9)
    assert fut.result(timeout=30) == 81
    name = f"stranger-{uuid.uuid4().hex[:8]}"  # a new user: the session's stack has others (mallory)
    out = tether(stack.env, "service", "user-add", name).stdout
    token = out.split("token:")[1].strip()
    other = Client(stack.service_url, token)
    assert other.whoami()["name"] == name
    assert other.list_endpoints() == []
    with pytest.raises(UnknownEndpoint):
        other.get_endpoint(stack.endpoint_id)
    with pytest.raises(Exception, match="unknown task"):
        other.get_task(fut.task_id)
    with Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=token) as ex:
        with pytest.raises(UnknownEndpoint):
            ex.submit(helpers.square, 2).result(timeout=30)


def test_metrics_and_openapi(stack: LocalStack, executor: Executor) -> None:
    import httpx

    executor.submit(helpers.square, 1).result(timeout=30)
    text = httpx.get(stack.service_url + "/metrics", trust_env=False).text
    assert "tether_endpoints_online 1.0" in text
    assert 'tether_task_events_total{event="results"}' in text
    assert 'tether_endpoint_workers{kind="workers_total"}' in text
    assert stack.endpoint_id not in text  # unauthenticated: names nobody's endpoints
    spec = httpx.get(stack.service_url + "/openapi.json", trust_env=False).json()
    assert {"/v1/endpoints", "/v1/tasks/{task_id}", "/v1/task_groups/{group_id}", "/v1/whoami"} <= set(spec["paths"])


def test_dashboard_shows_only_your_endpoints_tasks_and_failures(stack: LocalStack, executor: Executor) -> None:
    import httpx

    with pytest.raises(ValueError):
        executor.submit(helpers.fail_with, ValueError("dashboard-visible")).result(timeout=30)
    page = httpx.get(stack.service_url + "/dashboard", trust_env=False)
    assert page.status_code == 200 and "/v1/dashboard" in page.text
    assert httpx.get(stack.service_url + "/v1/dashboard", trust_env=False).status_code == 401
    data = httpx.get(stack.service_url + "/v1/dashboard", headers={"Authorization": f"Bearer {stack.token}"},
                     trust_env=False).json()
    [ep] = [e for e in data["endpoints"] if e["endpoint_id"] == stack.endpoint_id]
    assert ep["online"] and ep["status"]["capacity"]["workers_total"] == 2
    assert data["task_counts"]["failed"] >= 1 and data["task_counts"]["success"] >= 1
    assert any("dashboard-visible" in f["error"] for f in data["recent_failures"])
    token = tether(stack.env, "service", "user-add", "eve").stdout.split("token:")[1].strip()
    other = httpx.get(stack.service_url + "/v1/dashboard", headers={"Authorization": f"Bearer {token}"},
                      trust_env=False).json()
    assert (other["user"], other["endpoints"], other["task_counts"], other["open_counts"], other["groups"],
            other["recent_failures"]) == ("eve", [], {}, {}, [], [])
    assert not any(sum(series) for series in other["activity"]["by_state"].values())


def test_json_logs(tmp_path: Path) -> None:
    env = {**os.environ, "TETHER_HOME": str(tmp_path), "TETHER_LOG_FORMAT": "json"}
    stack = LocalStack(home=tmp_path, env=env)
    stack.start_service("--log-level", "info")
    try:
        stack.configure_endpoint("thread", 1)
        stack.start_endpoint()
    finally:
        stack.stop_endpoint()
        stack.stop_service()
    for log in (tmp_path / "service.log", stack.endpoint_dir() / "endpoint.log"):
        entries = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        assert entries, f"no JSON log lines in {log}"
        assert all({"ts", "level", "logger", "message"} <= set(e) for e in entries)
    endpoint_log = (stack.endpoint_dir() / "endpoint.log").read_text()
    assert '"logger": "tether.endpoint"' in endpoint_log and "connected to" in endpoint_log


def test_foreground_endpoint_and_service_are_stopped_by_stop(stack: LocalStack, tmp_path: Path) -> None:
    """'stop' checks that a recorded pid still runs Tether: processes started in the foreground by
    the console script ('tether endpoint start NAME', 'tether service start') pass that check."""
    console_script = str(Path(sys.executable).parent / "tether")
    tether(stack.env, "endpoint", "configure", "fg", "--engine", "thread", "--workers", "1", "--force")
    tether(stack.env, "endpoint", "start", "fg", "--detach")  # registers it
    tether(stack.env, "endpoint", "stop", "fg")
    proc = subprocess.Popen([console_script, "endpoint", "start", "fg"], env=stack.env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        status_file = stack.endpoint_dir("fg") / "status.json"
        wait_for(lambda: status_file.exists() and json.loads(status_file.read_text()).get("pid") == proc.pid,
                 what="the foreground endpoint to write its status")
        assert "stopped endpoint fg" in tether(stack.env, "endpoint", "stop", "fg").stdout
        assert proc.wait(timeout=30) is not None
    finally:
        proc.kill()
        proc.wait()
    tether(stack.env, "endpoint", "delete", "fg", "--yes")

    env = {**stack.env, "TETHER_HOME": str(tmp_path / "home")}
    service = subprocess.Popen([console_script, "service", "start", "--port", "0"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        info_file = tmp_path / "home" / "service.json"
        wait_for(lambda: info_file.exists() and json.loads(info_file.read_text()).get("pid") == service.pid,
                 what="the foreground service to write service.json")
        assert f"stopped the service (pid {service.pid})" in tether(env, "service", "stop").stdout
        assert service.wait(timeout=30) is not None
    finally:
        service.kill()
        service.wait()
