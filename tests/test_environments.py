"""Matching environments (issue 22): a task asks for a Python version and packages, the endpoint
builds that environment once with uv, caches it, and runs the task there.

The endpoint daemon runs on this venv's Python (3.11); the client that submits the tasks runs on
Python 3.12 (a venv made here with uv, with Tether and ``packaging`` at a release other than
this venv's), because a function pickled on 3.11 does not load on 3.12 (the endpoint says so in
words: ``VersionMismatch``). That is the user's situation the feature is for.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import psutil
import pytest
import yaml

import tether
from tether import EnvironmentUnavailable, Executor, InvalidEnvironment, TaskFailed
from tether.endpoint.config import parse_config
from tether.endpoint.environments import BUILD_LOG, MANIFEST, EnvironmentCache, EnvironmentSettings, find_uv
from tether.environment import EnvironmentRequest, imported_modules, match_environment, parse_environment
from tether.errors import ConfigError
from tether.local import LocalStack

from conftest import multi_user_missing, tether_cli, wait_for

#: a pure-Python package at a release other than the one this venv has (25.x)
PINNED = "packaging==23.2"
#: the client's numpy: another major release than this venv's (2.x), with wheels for 3.12
NUMPY = "numpy==1.26.4"
CHECKOUT = Path(tether.__file__).resolve().parent.parent


def _missing() -> str | None:
    if find_uv() is None:
        return "needs uv (pip install 'tether[environments]')"
    if EnvironmentCache(EnvironmentSettings(), Path("/nonexistent")).find_interpreter("3.12") is None:
        return "needs a Python 3.12 interpreter (pyenv's, uv's or /usr/bin/python3.12)"
    return None


MISSING = _missing()
cloudpickle.register_pickle_by_value(sys.modules[__name__])
needs_uv_and_312 = pytest.mark.skipif(MISSING is not None and not os.environ.get("CI"), reason=MISSING or "")


# --- what the client computes ------------------------------------------------------------------
def uses_yaml_and_an_import(x):
    import packaging.version  # noqa: F401 - imported in the body: the client must see it

    return yaml.safe_dump(x) + platform.system()


def test_match_finds_the_distributions_the_code_uses_at_installed_versions():
    from importlib.metadata import version

    def closure():
        return uses_yaml_and_an_import({"a": 1})

    # this module's functions are pickled by value (conftest registers it), as a script's are
    assert {"yaml", "packaging", "platform"} <= imported_modules(closure)
    request = match_environment(closure)
    assert request.python == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert f"PyYAML=={version('pyyaml')}" in request.requirements
    assert f"packaging=={version('packaging')}" in request.requirements
    assert not any(r.lower().startswith(("platform", "tether")) for r in request.requirements)  # stdlib, ours


def test_a_function_pickled_by_reference_needs_only_its_own_distribution():
    request = match_environment(yaml.safe_dump)
    assert [r.split("==")[0] for r in request.requirements] == ["PyYAML"]


def test_a_request_keys_the_same_environment_in_any_order():
    one = parse_environment({"python": "3.12", "requirements": ["a==1", "b==2"]})
    assert one.key() == parse_environment({"python": "3.12", "requirements": ["b==2", "a==1"]}).key()
    assert one.key() != parse_environment({"python": "3.13", "requirements": ["b==2", "a==1"]}).key()


@pytest.mark.parametrize("bad, words", [
    ({"python": "3.12", "requirements": ["x @ https://example.org/x.whl"]}, "URLs, paths and installer options"),
    ({"python": "3.12", "requirements": ["--index-url=https://evil"]}, "URLs, paths and installer options"),
    ({"python": "twelve"}, "'python' as a minor version"),
    ({"python": "3.12", "packages": []}, "packages"),
    ("3.12", "must be 'match' or a dict"),
])
def test_a_malformed_request_is_refused_at_the_executor_in_words(stack: LocalStack, bad, words):
    with pytest.raises(InvalidEnvironment, match="environment") as info:
        Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token, environment=bad)
    assert words in str(info.value)


def test_the_config_section_is_validated_in_words(tmp_path):
    with pytest.raises(ConfigError, match="environments"):
        parse_config("e", "environments: {enabled: yes-please}\n", str(tmp_path / "config.yaml"))
    with pytest.raises(ConfigError, match="max_byte"):
        parse_config("e", "environments: {enabled: true, max_byte: 10}\n", str(tmp_path / "config.yaml"))
    cfg = parse_config("e", "environments: {enabled: true, max_bytes: 1000000000}\n", str(tmp_path / "c.yaml"))
    assert EnvironmentSettings.from_config(cfg.environments).max_bytes == 1_000_000_000


def test_eviction_removes_the_least_recently_used_beyond_the_cap(tmp_path):
    cache = EnvironmentCache(EnvironmentSettings(max_bytes=3 * 2**20), tmp_path)
    now = time.time()
    for i, key in enumerate(("old", "middle", "new", "running")):
        where = tmp_path / key
        (where / "venv").mkdir(parents=True)
        (where / "venv" / "blob").write_bytes(os.urandom(2**20))
        (where / MANIFEST).write_text(json.dumps({"python": "3.12", "requirements": [], "build_s": 1.0}))
        os.utime(where, (now - 1000 + i * 100, now - 1000 + i * 100))
    os.utime(tmp_path / "running", (now - 5000, now - 5000))  # the oldest, but its workers run
    removed = cache.evict(in_use={"running"})
    assert removed == ["old", "middle"]
    assert sorted(e.key for e in cache.entries()) == ["new", "running"]


# --- end to end: a 3.12 client, a 3.11 endpoint -------------------------------------------------
@pytest.fixture(scope="module")
def client312(tmp_path_factory) -> Path:
    """A Python 3.12 venv with this Tether and ``packaging`` 23.2: the client of these tests."""
    if MISSING is not None and not os.environ.get("CI"):
        pytest.skip(MISSING)
    where = tmp_path_factory.mktemp("client312") / "venv"
    uv = find_uv()
    python = EnvironmentCache(EnvironmentSettings(), where).find_interpreter("3.12")
    subprocess.run([uv, "venv", "-q", "--python", python, str(where)], check=True, timeout=120)
    subprocess.run([uv, "pip", "install", "-q", "--python", str(where / "bin" / "python"), "-e", str(CHECKOUT),
                    PINNED, NUMPY], check=True, timeout=600)
    return where / "bin" / "python"


#: the test endpoint's environment workers stop after this long without a task
IDLE_S = 2.0


@pytest.fixture(scope="module")
def env_endpoint(stack: LocalStack, tmp_path_factory) -> tuple[str, Path]:
    """An endpoint beside the stack's that builds environments into a cache of its own."""
    cache = tmp_path_factory.mktemp("envcache")
    stack.configure_endpoint("process", 1, name="envs")
    config = stack.endpoint_dir("envs") / "config.yaml"
    config.write_text(config.read_text() + yaml.safe_dump(
        {"environments": {"enabled": True, "cache_dir": str(cache), "workers": 1, "idle_timeout_s": IDLE_S}}))
    endpoint_id = stack.start_endpoint("envs")
    yield endpoint_id, cache
    stack.stop_endpoint("envs")


CLIENT = """
import json, sys
import packaging
from tether import Executor

def where():
    import sys, packaging
    return [list(sys.version_info[:2]), packaging.__version__, sys.prefix]

def matched():  # what "match" looks at: packaging, a global here
    return [list(sys.version_info[:2]), packaging.__version__]

endpoint, mode = sys.argv[1], sys.argv[2]
if mode == "explicit":  # two tasks at once for an environment not built yet, then one per task
    with Executor(endpoint_id=endpoint, environment={"python": "3.12", "requirements": [PINNED]}) as ex:
        first = [ex.submit(where), ex.submit(where)]
        out = [f.result(timeout=600) for f in first]
    with Executor(endpoint_id=endpoint) as ex:
        out.append(ex.submit_task(where, environment={"python": "3.12", "requirements": [PINNED]})
                   .result(timeout=120))
elif mode == "match":
    with Executor(endpoint_id=endpoint, environment="match") as ex:
        out = [ex.submit(matched).result(timeout=600)]
elif mode == "numpy":  # the issue's case: the client's Python and numpy, not the endpoint's
    import numpy as np

    def with_numpy(n):
        return [list(sys.version_info[:2]), np.__version__, float(np.arange(n).sum())]

    with Executor(endpoint_id=endpoint, environment="match") as ex:
        out = [ex.submit(with_numpy, 10).result(timeout=600)]
    with Executor(endpoint_id=endpoint) as ex:  # without: the endpoint's Python refuses the 3.12 pickle
        try:
            ex.submit(with_numpy, 10).result(timeout=60)
        except Exception as exc:
            out.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
print(json.dumps(out))
""".replace("PINNED", repr(PINNED))


def _run_client(python: Path, stack: LocalStack, endpoint_id: str, mode: str, tmp_path: Path,
                stderr: list[str] | None = None) -> list:
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    proc = subprocess.run([str(python), str(script), endpoint_id, mode], env=stack.env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    if stderr is not None:
        stderr.append(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_uv_and_312
@pytest.mark.timeout(600)
def test_tasks_run_on_the_python_and_packages_they_ask_for_built_once(stack, client312, env_endpoint, tmp_path):
    endpoint_id, cache = env_endpoint
    results = _run_client(client312, stack, endpoint_id, "explicit", tmp_path)
    assert [r[:2] for r in results] == [[[3, 12], "23.2"]] * 3  # the daemon runs 3.11 with packaging 25
    (built,) = {r[2] for r in results}
    assert Path(built).parent.parent == cache
    key_dir = Path(built).parent
    log = (key_dir / BUILD_LOG).read_text()
    assert log.count("$ ") == 2 and log.count(" venv ") == 1  # two tasks at once, one build
    manifest = json.loads((key_dir / MANIFEST).read_text())

    # "match" computes the same request (Python 3.12, packaging 23.2): after a restart (no workers
    # left from before), the environment cached on disk serves it
    stack.stop_endpoint("envs")
    assert stack.start_endpoint("envs") == endpoint_id
    assert _run_client(client312, stack, endpoint_id, "match", tmp_path) == [[[3, 12], "23.2"]]
    assert json.loads((key_dir / MANIFEST).read_text()) == manifest  # not rebuilt
    assert (key_dir / BUILD_LOG).read_text() == log

    status = tether_cli(stack.env, "endpoint", "status", "envs", "--json")
    envs = json.loads(status.stdout)["environments"]
    (entry,) = [e for e in envs["cached"] if e["key"] == key_dir.name]
    assert envs["enabled"] and (entry["python"], entry["requirements"]) == ("3.12", [PINNED])
    assert entry["bytes"] > 1_000_000 and envs["total_bytes"] >= entry["bytes"]
    shown = tether_cli(stack.env, "endpoint", "status", "envs").stdout
    assert key_dir.name in shown and PINNED in shown and "MiB" in shown


@needs_uv_and_312
@pytest.mark.timeout(600)
def test_match_runs_on_the_clients_python_and_numpy_not_the_endpoints(stack, client312, env_endpoint, tmp_path):
    import numpy

    endpoint_id, _ = env_endpoint
    assert sys.version_info[:2] == (3, 11) and numpy.__version__.startswith("2.")  # the endpoint's daemon
    said: list[str] = []
    matched, without = _run_client(client312, stack, endpoint_id, "numpy", tmp_path, said)
    assert matched == [[3, 12], NUMPY.split("==")[1], 45.0]
    assert without.startswith("VersionMismatch: payload was serialized by Python 3.12 but is being loaded "
                              "by Python 3.11")
    assert "runs Python 3.11 but this client runs Python 3.12" in said[0]  # before the first task, as before
    assert "environment='match'" in said[0]


def _environment_workers(stack: LocalStack) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(stack.endpoint_pid("envs")).children():
        try:
            if "environment_worker" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:  # gone, or a zombie on its way out
            continue
    return found


@needs_uv_and_312
@pytest.mark.timeout(300)
def test_idle_environment_workers_stop_and_start_again(stack, client312, env_endpoint, tmp_path):
    endpoint_id, _ = env_endpoint
    assert _run_client(client312, stack, endpoint_id, "match", tmp_path) == [[[3, 12], "23.2"]]
    wait_for(lambda: not _environment_workers(stack), timeout=IDLE_S + 15, what="idle environment workers to stop")
    assert _run_client(client312, stack, endpoint_id, "match", tmp_path) == [[[3, 12], "23.2"]]


@needs_uv_and_312
@pytest.mark.timeout(300)
def test_a_build_failure_fails_the_task_with_uvs_message(stack, env_endpoint):
    endpoint_id, cache = env_endpoint
    # the build fails before anything is unpickled there, so a 3.11 client sees it too
    with Executor(endpoint_id=endpoint_id, service=stack.service_url, token=stack.token,
                  environment={"python": "3.12", "requirements": ["tether-no-such-package-xyz==1.0"]}) as ex:
        with pytest.raises(EnvironmentUnavailable) as info:
            ex.submit(platform.python_version).result(timeout=240)
    text = str(info.value)
    assert isinstance(info.value, TaskFailed) and text.startswith("building the environment failed")
    assert "tether-no-such-package-xyz was not found in the package registry" in text  # uv's own words
    key = EnvironmentRequest(python="3.12", requirements=["tether-no-such-package-xyz==1.0"]).key()
    assert not (cache / key / "venv").exists() and (cache / key / BUILD_LOG).exists()


@needs_uv_and_312
@pytest.mark.timeout(120)
def test_no_interpreter_of_that_version_is_said_in_words(stack, env_endpoint):
    endpoint_id, _ = env_endpoint
    with Executor(endpoint_id=endpoint_id, service=stack.service_url, token=stack.token,
                  environment={"python": "3.99"}) as ex:
        with pytest.raises(EnvironmentUnavailable, match="has no Python 3.99 interpreter.*environments: interpreters:"):
            ex.submit(platform.python_version).result(timeout=60)


@pytest.mark.timeout(60)
def test_an_endpoint_that_does_not_build_environments_refuses_in_words(stack: LocalStack):
    with Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token,
                  environment={"python": "3.12", "requirements": [PINNED]}) as ex:
        with pytest.raises(EnvironmentUnavailable) as info:
            ex.submit(platform.python_version).result(timeout=30)
    with Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token) as ex:
        assert ex.submit(platform.python_version).result(timeout=30) == platform.python_version()  # its own: fine
    text = str(info.value)
    assert "does not build environments" in text
    assert "environments: {enabled: true}" in text and str(stack.endpoint_dir() / "config.yaml") in text


# --- a multi-user endpoint: each user's environments are built in that user's account ----------
def who_and_where():
    import os
    import sys

    import packaging

    return os.getuid(), sys.prefix, packaging.__version__


@needs_uv_and_312
@pytest.mark.skipif(bool(multi_user_missing()) and not os.environ.get("CI"), reason=str(multi_user_missing()))
@pytest.mark.timeout(300)
def test_a_user_endpoint_builds_environments_in_the_users_account(stack: LocalStack):
    import pwd

    local = "tether_alice"
    try:
        account = pwd.getpwnam(local)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", local], check=True)
        account = pwd.getpwnam(local)
    tether_cli(stack.env, "endpoint", "configure", "mu-envs", "--multi-user", "--force")
    d = stack.endpoint_dir("mu-envs")
    (d / "identity_mapping.json").write_text(json.dumps([{
        "DATA_TYPE": "expression_identity_mapping#1.0.0",
        "mappings": [{"source": "{username}", "match": "envuser", "output": local}]}]))
    # the administrator's template turns environments on for every user endpoint, with this interpreter
    interpreter = EnvironmentCache(EnvironmentSettings(), d).find_interpreter(f"{sys.version_info[0]}."
                                                                           f"{sys.version_info[1]}")
    template = d / "user_config_template.yaml.j2"
    template.write_text(template.read_text() + yaml.safe_dump(
        {"environments": {"enabled": True, "interpreters": [interpreter]}}))
    added = tether_cli(stack.env, "service", "user-add", f"envuser-{os.getpid()}", "--json", check=False)
    if added.returncode != 0:
        pytest.fail(added.stdout + added.stderr)
    token = json.loads(added.stdout)["token"]
    (d / "identity_mapping.json").write_text((d / "identity_mapping.json").read_text().replace(
        '"envuser"', f'"envuser-{os.getpid()}"'))
    endpoint_id = stack.start_endpoint("mu-envs")
    try:
        with Executor(endpoint_id=endpoint_id, service=stack.service_url, token=token,
                      environment={"python": f"{sys.version_info[0]}.{sys.version_info[1]}",
                                   "requirements": [PINNED]}) as ex:
            uid, prefix, version = ex.submit(who_and_where).result(timeout=240)
    finally:
        stack.stop_endpoint("mu-envs")
    assert (uid, version) == (account.pw_uid, "23.2")
    assert prefix.startswith(account.pw_dir + "/") and Path(prefix).stat().st_uid == account.pw_uid


def leave_a_mark(path):
    from pathlib import Path

    Path(path).write_text("ran")
    return "ran"


@needs_uv_and_312
@pytest.mark.timeout(300)
def test_a_task_cancelled_while_its_environment_builds_never_runs(stack, env_endpoint, tmp_path):
    from tether import TaskCancelled

    endpoint_id, cache = env_endpoint
    this = f"{sys.version_info[0]}.{sys.version_info[1]}"  # this client's Python: its pickles load there
    request = {"python": this, "requirements": ["packaging==22.0"]}
    key = EnvironmentRequest(python=this, requirements=["packaging==22.0"]).key()
    mark = tmp_path / "mark"
    with Executor(endpoint_id=endpoint_id, service=stack.service_url, token=stack.token, environment=request) as ex:
        doomed = ex.submit(leave_a_mark, str(mark))
        wait_for(lambda: (cache / key).exists(), timeout=60, what="the build to start")
        assert doomed.cancel()
        with pytest.raises(TaskCancelled):
            doomed.result(timeout=30)
        # the build goes on and serves the next task; the cancelled one never ran
        assert ex.submit(leave_a_mark, str(tmp_path / "other")).result(timeout=240) == "ran"
    assert not mark.exists() and (cache / key / MANIFEST).exists()


# --- through the Parsl plugin: parsl_resource_specification={"environment": "match"} -------------
@needs_uv_and_312
@pytest.mark.timeout(400)
def test_a_parsl_app_runs_in_the_environment_match_computes_for_it(stack, env_endpoint, tmp_path):
    from importlib.metadata import version

    import parsl

    from parsl_stack import loaded, tether_executor

    endpoint_id, cache = env_endpoint

    @parsl.python_app
    def where_and_what(parsl_resource_specification=None):  # Parsl passes it only to apps that name it
        import sys

        import packaging

        return sys.prefix, packaging.__version__

    with loaded(tmp_path, tether_executor(stack, endpoint_id=endpoint_id)):
        prefix, found = where_and_what(parsl_resource_specification={"environment": "match"}).result(timeout=360)
    # an environment of the endpoint's, with this client's packaging and Parsl (Parsl's app wrappers run there)
    assert Path(prefix).parent.parent == cache and found == version("packaging")
    requirements = json.loads((Path(prefix).parent / MANIFEST).read_text())["requirements"]
    assert f"parsl=={parsl.__version__}" in requirements and f"packaging=={found}" in requirements


@needs_uv_and_312
@pytest.mark.timeout(300)
def test_large_arguments_and_results_cross_into_and_out_of_an_environment(stack, env_endpoint):
    endpoint_id, _ = env_endpoint
    this = f"{sys.version_info[0]}.{sys.version_info[1]}"
    big = os.urandom(1024) * (20 * 1024)  # 20 MiB: over the blob threshold, so it travels as a blob
    with Executor(endpoint_id=endpoint_id, service=stack.service_url, token=stack.token,
                  environment={"python": this, "requirements": ["packaging==22.0"]}) as ex:
        assert ex.submit(len, big).result(timeout=240) == len(big)
        assert ex.submit(bytes, len(big)).result(timeout=120) == bytes(len(big))
