"""What an administrator runs an endpoint with (issue 24): ``endpoint_setup`` and
``endpoint_teardown`` around the daemon, and ``tether endpoint diagnose``, whose bundle a
support team can read without finding a secret in it. Real daemons, started by the CLI."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

from tether import Executor
from tether.local import LocalStack

import helpers
from conftest import tether_cli


def _tether(stack: LocalStack, *args: str) -> subprocess.CompletedProcess:
    return tether_cli(stack.env, *args, check=False)


def _add_to_config(stack: LocalStack, name: str, text: str) -> None:
    config = stack.endpoint_dir(name) / "config.yaml"
    config.write_text(config.read_text() + text)


def test_setup_runs_before_the_endpoint_serves_teardown_after_it_stops_and_a_failing_setup_stops_the_start(
        stack: LocalStack) -> None:
    name = "hooked"
    stack.configure_endpoint("process", 1, name=name)
    _add_to_config(stack, name, 'endpoint_setup: "echo up $TETHER_ENDPOINT_NAME > setup.out"\n'
                                'endpoint_teardown: "echo down $TETHER_ENDPOINT_ID > teardown.out"\n')
    directory = stack.endpoint_dir(name)
    endpoint_id = stack.start_endpoint(name)
    try:
        assert (directory / "setup.out").read_text() == f"up {name}\n"
        assert not (directory / "teardown.out").exists()
        with Executor(endpoint_id=endpoint_id, service=stack.service_url, token=stack.token) as ex:
            assert ex.submit(helpers.add, 2, 3).result(timeout=60) == 5
    finally:
        stack.stop_endpoint(name)
    assert (directory / "teardown.out").read_text() == f"down {endpoint_id}\n"

    # a setup that fails: the endpoint does not start, and says why with the command's own words
    config = directory / "config.yaml"
    config.write_text(config.read_text().replace('"echo up $TETHER_ENDPOINT_NAME > setup.out"',
                                                 '"echo cannot mount /scratch >&2; exit 3"'))
    started = _tether(stack, "endpoint", "start", name, "--detach")
    assert started.returncode != 0
    said = started.stdout + started.stderr
    assert "endpoint_setup" in said and "exited with code 3" in said and "cannot mount /scratch" in said
    assert "Traceback" not in said
    assert _tether(stack, "endpoint", "status", name, "--json").returncode == 0
    assert json.loads(_tether(stack, "endpoint", "status", name, "--json").stdout)["running"] is False


def test_diagnose_writes_a_bundle_with_config_logs_versions_and_connectivity_and_no_secret(
        stack: LocalStack, tmp_path: Path) -> None:
    credential = json.loads((stack.endpoint_dir() / "credential.json").read_text())
    secret = credential["secret"]
    with open(stack.endpoint_dir() / "endpoint.log", "a") as log:  # as a careless log line might
        log.write(f"debug: connecting with secret={secret} and token: {stack.token}\n"
                  f"debug: header Authorization: Bearer {secret}\n")
    out = tmp_path / "bundle.tar.gz"
    done = _tether(stack, "endpoint", "diagnose", stack.endpoint_name, "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert "reachable" in done.stdout and str(out) in done.stdout.replace("\n", "")
    assert out.stat().st_mode & 0o777 == 0o600
    with tarfile.open(out) as tar:
        files = {m.name.split("/", 1)[1]: tar.extractfile(m).read().decode() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert "credential.json" not in " ".join(files)
    expected = {"summary.json", "versions.json", "connectivity.json", "config/config.yaml", "logs/endpoint.log"}
    assert expected <= set(files)
    everything = "\n".join(files.values())
    assert secret not in everything and stack.token not in everything
    assert "secret=<redacted>" in files["logs/endpoint.log"]
    summary = json.loads(files["summary.json"])
    assert summary["endpoint_id"] == credential["endpoint_id"] and summary["running"] is True
    assert "tether" in json.loads(files["versions.json"])["packages"]
    reach = json.loads(files["connectivity.json"])
    assert reach["ok"] is True and reach["http_status"] == 200

    # an endpoint that does not exist: words, no traceback
    missing = _tether(stack, "endpoint", "diagnose", "no-such-endpoint")
    assert missing.returncode != 0 and "no endpoint named 'no-such-endpoint'" in missing.stdout + missing.stderr
    assert "Traceback" not in missing.stdout + missing.stderr
