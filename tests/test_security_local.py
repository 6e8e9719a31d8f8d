"""Trust boundaries on the user's own machine: names that become paths, pid files that outlive
their process, and tokens that must reach only the service that issued them.

No service is needed here: the CLI runs as a user types it (subprocesses in a private
TETHER_HOME), and the token tests talk to a real HTTP server on a real socket.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tether import Client, ConfigError, Executor
from tether.config import find_service
from tether.home import write_secret
from tether.ids import InvalidIdentifier
from tether.urls import same_service

#: names that would leave $TETHER_HOME/endpoints if they became a path unchecked
PATH_LIKE_NAMES = ["..", ".", "a/b", "../decoy", "../../decoy", "ok/../..", ".hidden", "ok/"]


def tether(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tether.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A TETHER_HOME with one configured endpoint, a file that marks the home itself, and a decoy
    directory next to it that no endpoint command may touch."""
    home = tmp_path / "home"
    (home / "endpoints").mkdir(parents=True)
    (home / "keep-me").write_text("home")
    (tmp_path / "decoy").mkdir()
    (tmp_path / "decoy" / "precious").write_text("decoy")
    return home


@pytest.fixture
def env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TETHER_SERVICE_URL", "TETHER_TOKEN")}
    env.update(TETHER_HOME=str(home), COLUMNS="1000")  # COLUMNS: rich does not wrap the messages
    return env


def _untouched(home: Path) -> None:
    assert (home / "keep-me").read_text() == "home"
    assert (home.parent / "decoy" / "precious").read_text() == "decoy"
    assert sorted(p.name for p in (home / "endpoints").iterdir()) == ["ok"]


# --- 1. endpoint names that become directories ----------------------------------------------
def test_endpoint_delete_refuses_path_like_names_and_deletes_nothing(home: Path, env: dict[str, str]) -> None:
    assert tether(env, "endpoint", "configure", "ok", "--engine", "thread").returncode == 0
    for name in [*PATH_LIKE_NAMES, str(home.parent / "decoy"), str(home)]:
        out = tether(env, "endpoint", "delete", name, "--yes")
        assert out.returncode == 1, (name, out.stdout, out.stderr)
        assert f"invalid endpoint name {name!r}" in out.stderr, out.stderr
        assert "starting with a letter or digit" in out.stderr  # says what a name may be
        _untouched(home)


def test_every_endpoint_command_refuses_dot_dot(home: Path, env: dict[str, str]) -> None:
    assert tether(env, "endpoint", "configure", "ok", "--engine", "thread").returncode == 0
    for command in (["configure", "..", "--force"], ["configure", "a/b"], ["start", ".."], ["stop", ".."],
                    ["restart", ".."], ["status", ".."], ["delete", "..", "--yes"]):
        out = tether(env, "endpoint", *command)
        assert out.returncode == 1 and "invalid endpoint name" in out.stderr, (command, out.stdout, out.stderr)
        _untouched(home)
    assert not (home / "config.yaml").exists() and not (home / "endpoints" / "a").exists()


def test_names_are_checked_again_where_they_become_paths(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Code that skips the CLI (a script, tether.local) meets the same check in endpoint_dir."""
    from tether.endpoint import manage
    from tether.endpoint.config import endpoint_dir
    from tether.local import LocalStack

    monkeypatch.setenv("TETHER_HOME", str(home))
    manage.configure("ok", "thread")
    for name in [*PATH_LIKE_NAMES, str(home.parent / "decoy")]:
        with pytest.raises(InvalidIdentifier, match="invalid endpoint name"):
            manage.delete(name)
        with pytest.raises(InvalidIdentifier):
            endpoint_dir(name)
        with pytest.raises(InvalidIdentifier):
            LocalStack(home=home, endpoint_name=name)
        _untouched(home)
    assert endpoint_dir("x" * 128).name == "x" * 128  # names may be longer than ids


def test_parsl_control_files_refuse_path_like_task_ids(tmp_path: Path) -> None:
    from tether.endpoint.engines.parsl.worker import WorkerRun, control_file, run_in_worker
    from tether.endpoint.execute import TaskSpec

    control = tmp_path / "run" / "control"
    control.mkdir(parents=True)
    assert control_file(control, "task-1", ".0.run") == control / "task-1.0.run"
    for task_id in ("../escape", "../../escape", "..", "/tmp/escape", "a/b"):
        with pytest.raises(InvalidIdentifier, match="invalid task id"):
            control_file(control, task_id, ".cancel")
        with pytest.raises(InvalidIdentifier, match="invalid task id"):
            run_in_worker(TaskSpec(task_id, "0" * 32, None, b"", None, None), WorkerRun({}, str(control), None))
    assert list(control.iterdir()) == []
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["control", "run"]


# --- 2. stop signals only the process it started --------------------------------------------
@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process of the user's, holding a pid a stale pid file might name."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


def _impostor(*argv: str) -> subprocess.Popen[bytes]:
    """A process whose command line looks like a Tether daemon's (a sleeping Python)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", *argv])


def test_endpoint_stop_never_signals_a_reused_pid(home: Path, env: dict[str, str],
                                                  bystander: subprocess.Popen[bytes]) -> None:
    assert tether(env, "endpoint", "configure", "ok", "--engine", "thread").returncode == 0
    pid_file = home / "endpoints" / "ok" / "daemon.pid"
    pid_file.write_text(str(bystander.pid))  # the daemon died; its pid now belongs to `sleep`
    status = json.loads(tether(env, "endpoint", "status", "ok", "--json").stdout)
    assert status["running"] is False and status["pid"] is None
    pid_file.write_text(str(bystander.pid))
    out = tether(env, "endpoint", "stop", "ok")
    assert out.returncode == 0 and "endpoint ok was not running" in out.stdout, out.stdout + out.stderr
    assert bystander.poll() is None  # still running: never signalled
    assert not pid_file.exists()  # the stale file is gone


def test_endpoint_stop_checks_when_the_process_started(home: Path, env: dict[str, str]) -> None:
    """A process that merely looks like the daemon, but started after the pid file was written,
    is not the daemon that wrote it; the same process is stopped once the file is newer."""
    assert tether(env, "endpoint", "configure", "ok", "--engine", "thread").returncode == 0
    pid_file = home / "endpoints" / "ok" / "daemon.pid"
    proc = _impostor("tether.endpoint.daemon", "ok")
    try:
        pid_file.write_text(str(proc.pid))
        old = pid_file.stat().st_mtime - 60
        os.utime(pid_file, (old, old))  # written a minute before this process existed
        out = tether(env, "endpoint", "stop", "ok")
        assert "was not running" in out.stdout and proc.poll() is None, out.stdout + out.stderr
        pid_file.write_text(str(proc.pid))  # now written after it started: it is the daemon
        out = tether(env, "endpoint", "stop", "ok")
        assert "stopped endpoint ok" in out.stdout, out.stdout + out.stderr
        assert proc.wait(timeout=30) is not None
    finally:
        proc.kill()
        proc.wait()


def test_service_stop_never_signals_a_reused_pid(home: Path, env: dict[str, str],
                                                 bystander: subprocess.Popen[bytes]) -> None:
    path = home / "service.json"
    write_secret(path, json.dumps({"url": "http://127.0.0.1:9", "token": "t0ken", "pid": bystander.pid}))
    out = tether(env, "service", "stop")
    assert out.returncode == 0 and "the service was not running" in out.stdout, out.stdout + out.stderr
    assert bystander.poll() is None
    # the stale pid is dropped; url and token stay (a restarted service keeps its token)
    assert json.loads(path.read_text()) == {"url": "http://127.0.0.1:9", "token": "t0ken"}
    assert (path.stat().st_mode & 0o777) == 0o600

    proc = _impostor("-m", "tether.service.server")
    try:
        write_secret(path, json.dumps({"url": "http://127.0.0.1:9", "token": "t0ken", "pid": proc.pid}))
        out = tether(env, "service", "stop")
        assert f"stopped the service (pid {proc.pid})" in out.stdout, out.stdout + out.stderr
        assert proc.wait(timeout=30) is not None
    finally:
        proc.kill()
        proc.wait()
    assert bystander.poll() is None


# --- 3. a token goes only to the service it belongs to ----------------------------------------
FILE_URL = "http://127.0.0.1:8421"


@pytest.fixture
def service_json(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TETHER_HOME", str(home))
    monkeypatch.delenv("TETHER_SERVICE_URL", raising=False)
    monkeypatch.delenv("TETHER_TOKEN", raising=False)
    path = home / "service.json"
    write_secret(path, json.dumps({"url": FILE_URL, "token": "file-token", "pid": 1}))
    return path


def test_urls_compare_by_scheme_host_port_and_path() -> None:
    assert same_service("http://127.0.0.1:8421", "HTTP://127.0.0.1:8421/")
    assert same_service("http://Example.org", "http://example.org:80")
    assert same_service("https://example.org/tether/", "https://example.org:443/tether")
    assert not same_service("http://example.org", "https://example.org")
    assert not same_service("http://127.0.0.1:8421", "http://127.0.0.1:8422")
    assert not same_service("http://127.0.0.1:8421", "http://localhost:8421")
    assert not same_service("http://example.org", "http://example.org.evil.net")
    assert not same_service("http://example.org/a", "http://example.org/b")
    assert not same_service("not a url", "not a url")


def test_service_json_token_goes_only_to_its_own_url(service_json: Path) -> None:
    assert find_service() == find_service(FILE_URL)
    assert find_service("HTTP://127.0.0.1:8421/").token == "file-token"
    with pytest.raises(ConfigError) as info:
        find_service("http://127.0.0.1:9999")
    message = str(info.value)
    assert "no token for the service http://127.0.0.1:9999" in message
    assert "token=..." in message and "TETHER_SERVICE_URL=http://127.0.0.1:9999" in message
    assert "file-token" not in message
    assert find_service("http://127.0.0.1:9999", "its-own").token == "its-own"  # given with it: fine


def test_environment_pair_goes_only_to_its_own_url(service_json: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_SERVICE_URL", "https://tether.example.org/")
    monkeypatch.setenv("TETHER_TOKEN", "env-token")
    info = find_service()
    assert (info.url, info.token) == ("https://tether.example.org", "env-token")
    assert find_service("https://tether.example.org:443").token == "env-token"
    assert find_service(FILE_URL).token == "file-token"  # each URL gets its own token
    with pytest.raises(ConfigError, match="TETHER_TOKEN belongs to TETHER_SERVICE_URL=https://tether.example.org"):
        find_service("https://elsewhere.example.org")


def test_service_url_without_token_does_not_borrow_the_files_token(service_json: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_SERVICE_URL", "http://127.0.0.1:9999")
    with pytest.raises(ConfigError, match=r"holds a token for http://127\.0\.0\.1:8421"):
        find_service()
    monkeypatch.setenv("TETHER_SERVICE_URL", FILE_URL + "/")
    assert find_service().token == "file-token"


def test_lone_env_token_pairs_only_with_a_private_service_json(service_json: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_TOKEN", "env-token")
    info = find_service()
    assert (info.url, info.token) == (FILE_URL, "env-token")  # the env token overrides the file's
    assert find_service(FILE_URL).token == "env-token"
    with pytest.raises(ConfigError, match="TETHER_TOKEN belongs to the service in"):
        find_service("http://127.0.0.1:9999")  # never to a URL named in code
    service_json.chmod(0o620)  # another user may write the URL: the env token does not follow it
    with pytest.raises(ConfigError, match="not private to you"):
        find_service()
    monkeypatch.delenv("TETHER_HOME")
    monkeypatch.setenv("HOME", str(service_json.parent / "nohome"))
    with pytest.raises(ConfigError, match="no Tether service configured"):
        find_service()  # a token and no URL at all


class _Recorder(BaseHTTPRequestHandler):
    """Answers every GET with ``{}`` and remembers the Authorization header it was sent."""

    seen: list[str | None] = []

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        type(self).seen.append(self.headers.get("Authorization"))
        body = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def other_service() -> Iterator[tuple[str, list[str | None]]]:
    """A real HTTP server on a real socket, standing in for a service that issued no token to us."""
    seen: list[str | None] = []
    handler = type("Recorder", (_Recorder,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_no_token_is_sent_to_another_service(service_json: Path, monkeypatch: pytest.MonkeyPatch,
                                             other_service: tuple[str, list[str | None]]) -> None:
    other_url, seen = other_service
    monkeypatch.setenv("TETHER_TOKEN", "env-token")  # a lone env token, and the file's token
    with pytest.raises(ConfigError, match=f"no token for the service {other_url}"):
        Client(service=other_url)
    with pytest.raises(ConfigError, match=f"no token for the service {other_url}"):
        Executor("some-endpoint", service=other_url)
    assert seen == []
    # the server does record what it is sent: a token given for it arrives, and only that one
    with Client(other_url, token="issued-by-other") as client:
        client.whoami()
    assert seen == ["Bearer issued-by-other"]
