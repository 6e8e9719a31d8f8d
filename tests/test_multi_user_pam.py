"""PAM on a multi-user endpoint (issue 24): the host's PAM stack decides whether an account may
run tasks (an expired account is refused in words, a current one runs), and the user endpoint
lives inside a PAM session (what ``pam_limits`` sets, the user's tasks have). Real POSIX users,
the real PAM stack (a service file of this test's own in /etc/pam.d), the endpoint started as
root by the CLI. Needs root; skips with the reason outside it unless CI is set.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

import cloudpickle
import pytest
import yaml

from tether import Executor, TaskFailed
from tether.local import LocalStack

from conftest import multi_user_missing, tether_cli

cloudpickle.register_pickle_by_value(sys.modules[__name__])

SERVICE = "tether-test"
CURRENT, EXPIRED = "tether_pamok", "tether_pamold"
NOFILE = 777  # what this test's limits file gives the current account


def _missing() -> str | None:
    why = multi_user_missing()
    if why:
        return why
    if not Path("/lib/x86_64-linux-gnu/security/pam_limits.so").exists() and not Path(
            "/usr/lib/x86_64-linux-gnu/security/pam_limits.so").exists():
        return "PAM's pam_limits module is not installed (apt-get install libpam-modules)"
    try:
        import pamela  # noqa: F401
    except ImportError:
        return "the PAM binding is not installed: pip install 'tether[pam]'"
    return None


pytestmark = pytest.mark.skipif(bool(_missing()) and not os.environ.get("CI"), reason=str(_missing()))


def limits_and_uid() -> tuple[tuple[int, int], int]:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE), os.getuid()


def _cli(stack: LocalStack, *args: str) -> str:
    return tether_cli(stack.env, *args).stdout


@pytest.fixture(scope="module")
def pam_cluster(stack: LocalStack):
    for name in (CURRENT, EXPIRED):
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", name], check=True)
    subprocess.run(["usermod", "--expiredate", "", CURRENT], check=True)
    subprocess.run(["usermod", "--expiredate", "1", EXPIRED], check=True)  # expired on 1970-01-02
    pam_file = Path("/etc/pam.d") / SERVICE
    pam_file.write_text("account required pam_unix.so\nsession required pam_limits.so\n"
                        "session required pam_unix.so\n")
    limits = Path("/etc/security/limits.d/tether-test.conf")
    limits.parent.mkdir(parents=True, exist_ok=True)
    limits.write_text(f"{CURRENT} - nofile {NOFILE}\n")
    d = stack.endpoint_dir("pam-cluster")
    _cli(stack, "endpoint", "configure", "pam-cluster", "--multi-user", "--force")
    (d / "identity_mapping.json").write_text(json.dumps([{
        "DATA_TYPE": "expression_identity_mapping#1.0.0",
        "mappings": [{"source": "{username}", "match": "pam(ok|old)", "output": "tether_pam{0}"}],
    }]))
    config = yaml.safe_load((d / "config.yaml").read_text())
    config.update(pam={"enabled": True, "service": SERVICE}, idle_timeout_s=30, heartbeat_s=1)
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    tokens = {name: json.loads(_cli(stack, "service", "user-add", name, "--json"))["token"]
              for name in ("pamok", "pamold")}
    try:
        yield stack.start_endpoint("pam-cluster"), tokens
    finally:
        stack.stop_endpoint("pam-cluster")
        pam_file.unlink(missing_ok=True)
        limits.unlink(missing_ok=True)


def test_pam_refuses_an_expired_account_and_runs_a_current_one_inside_a_session(stack, pam_cluster) -> None:
    endpoint_id, tokens = pam_cluster
    with Executor(endpoint_id=endpoint_id, service=stack.service_url, token=tokens["pamold"],
                  user_endpoint_config={"workers": 1}) as ex:
        with pytest.raises(TaskFailed, match="could not start your user endpoint") as info:
            ex.submit(limits_and_uid).result(timeout=120)
    assert f"the account '{EXPIRED}' is refused by PAM (service '{SERVICE}', account checks)" in str(info.value)
    with Executor(endpoint_id=endpoint_id, service=stack.service_url, token=tokens["pamok"],
                  user_endpoint_config={"workers": 1}) as ex:
        (soft, hard), uid = ex.submit(limits_and_uid).result(timeout=120)
    assert uid == pwd.getpwnam(CURRENT).pw_uid
    assert (soft, hard) == (NOFILE, NOFILE)  # set by pam_limits in the session the user endpoint lives in
    audit = [json.loads(line) for line in (stack.endpoint_dir("pam-cluster") / "audit.log").read_text().splitlines()]
    assert any(e["event"] == "refused" and e.get("identity") == "pamold" for e in audit)
    assert not any(e["event"] == "started" and e.get("identity") == "pamold" for e in audit)
