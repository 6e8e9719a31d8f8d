"""The multi-user endpoint, for real: POSIX users made with useradd, the endpoint started as
root, tasks submitted as two identities, each run under its own account (issue 10).

Needs root (useradd, setuid). Outside root these tests skip with a message; under CI (which
runs as root) they must run.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tether import Client, Executor, TaskFailed, TetherError
from tether.local import LocalStack
from tether.protocol import Error, ErrorCode, Subscribe

import helpers
from conftest import multi_user_missing, wait_for
from rogue import raw_client

USERS = {"alice": "tether_alice", "bob": "tether_bob"}
LOG_CAP = 1024 * 1024  # each user endpoint's log file, in this module's multi-user endpoint


_why_not = multi_user_missing
pytestmark = pytest.mark.skipif(bool(_why_not()) and not os.environ.get("CI"), reason=str(_why_not()))


def _cli(stack: LocalStack, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "tether.cli", *args], env=stack.env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def cluster(stack: LocalStack):
    """A multi-user endpoint 'cluster' on the session's service; users alice, bob (mapped to
    tether_alice, tether_bob), carol (unmapped), mallory (mapped to root), sysop (to a system account),
    ghost (to nobody), noshell (to an account whose shell is nologin)."""
    assert not _why_not(), _why_not()
    for local in USERS.values():
        try:
            pwd.getpwnam(local)
        except KeyError:
            subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", local], check=True)
    try:
        pwd.getpwnam("tether_noshell")
    except KeyError:  # a real account that cannot log in: refused like a system account
        subprocess.run(["useradd", "--shell", "/usr/sbin/nologin", "tether_noshell"], check=True)
    d = stack.endpoint_dir("cluster")
    _cli(stack, "endpoint", "configure", "cluster", "--multi-user", "--force")
    (d / "identity_mapping.json").write_text(json.dumps([{
        "DATA_TYPE": "expression_identity_mapping#1.0.0",
        "mappings": [
            {"source": "{username}", "match": "(alice|bob)", "output": "tether_{0}"},
            {"source": "{username}", "match": "mallory", "output": "root"},
            {"source": "{username}", "match": "sysop", "output": "daemon"},
            {"source": "{username}", "match": "ghost", "output": "nobody"},
            {"source": "{username}", "match": "noshell", "output": "tether_noshell"},
        ],
    }]))
    config = yaml.safe_load((d / "config.yaml").read_text())
    config.update(idle_timeout_s=4, heartbeat_s=1, user_log_max_bytes=LOG_CAP, user_log_bytes_per_s=4 * LOG_CAP,
                  max_user_endpoints_per_user=3)
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    # the user config template and its schema stay as 'configure --multi-user' wrote them (issue 17, item 13:
    # the template it wrote once failed to render, so every user's first task failed)
    tokens = {name: json.loads(_cli(stack, "service", "user-add", name, "--json"))["token"]
              for name in ("alice", "bob", "carol", "mallory", "sysop", "ghost", "noshell")}
    endpoint_id = stack.start_endpoint("cluster")
    yield endpoint_id, tokens
    stack.stop_endpoint("cluster")
    # stopping the multi-user endpoint stops every user endpoint it started
    uids = {pwd.getpwnam(local).pw_uid for local in USERS.values()}
    wait_for(lambda: not [p for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real in uids],
             what="the user endpoints to stop with their multi-user endpoint")


def _executor(stack: LocalStack, endpoint_id: str, token: str, **config: object) -> Executor:
    return Executor(endpoint_id=endpoint_id, service=stack.service_url, token=token,
                    user_endpoint_config=config or None)


def test_each_user_runs_as_their_own_account(stack, cluster) -> None:
    endpoint_id, tokens = cluster
    seen = {}
    for name, local in USERS.items():
        fut = _executor(stack, endpoint_id, tokens[name], workers=1).submit(helpers.who_am_i)
        seen[name] = (fut, fut.result(timeout=120))
        account = pwd.getpwnam(local)
        info = seen[name][1]
        assert (info["uid"], info["gid"], info["home"]) == (account.pw_uid, account.pw_gid, account.pw_dir)
        assert info["uid"] != 0 and not info["regained_root"] and info["no_new_privs"] == "1"
        assert info["umask"] == 0o077 and info["cwd"].startswith(account.pw_dir)
        assert not info["secret_in_env"]
    # one user never sees the other's task: REST, cancel, WebSocket
    bob_task = seen["bob"][0].task_id
    headers = {"Authorization": f"Bearer {tokens['alice']}"}
    assert httpx.get(f"{stack.service_url}/v1/tasks/{bob_task}", headers=headers, trust_env=False).status_code == 404
    assert httpx.post(f"{stack.service_url}/v1/tasks/{bob_task}/cancel", headers=headers,
                      trust_env=False).status_code == 404
    peer = raw_client(stack.service_url, tokens["alice"])
    try:
        peer.send(Subscribe(ids=[bob_task]))
        err, _ = peer.recv_until(lambda m: isinstance(m, Error))
        assert err.code == ErrorCode.UNKNOWN_TASK
    finally:
        peer.close()
    # user endpoints are listed under their parent: all for its owner, only your own for you
    mine = Client(stack.service_url, tokens["alice"]).list_user_endpoints(endpoint_id)
    assert len(mine) == 1 and mine[0]["local_user"] == "tether_alice" and mine[0]["user"] is None
    every = Client(stack.service_url, stack.token).list_user_endpoints(endpoint_id)
    assert {u["user"]: u["local_user"] for u in every}.items() >= {"alice": "tether_alice", "bob": "tether_bob"}.items()
    # the audit log says who ran what as which uid
    lines = [json.loads(line) for line in (stack.endpoint_dir("cluster") / "audit.log").read_text().splitlines()]
    alice_task = seen["alice"][0].task_id
    done = [e for e in lines if e["event"] == "task" and e["task_id"] == alice_task and e["state"] == "success"]
    assert done and done[0]["local_user"] == "tether_alice" and done[0]["uid"] == pwd.getpwnam("tether_alice").pw_uid
    assert done[0]["identity"] == "alice"
    assert oct((stack.endpoint_dir("cluster") / "audit.log").stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize(("user", "config", "words"), [
    ("carol", {}, "no local account is mapped to identity 'carol'"),
    ("mallory", {}, "maps to 'root', a privileged account; user code never runs as root"),
    ("sysop", {}, "under this endpoint's min_uid 1000"),
    ("ghost", {}, "a special account above this endpoint's max_uid 60000"),
    ("noshell", {}, "does not allow logging in"),
    ("alice", {"workers": "many"}, "refused by this endpoint's schema: workers: 'many' is not of type 'integer'"),
    ("alice", {"workers": 1, "partition": "x\nengine: {type: thread}"}, "Additional properties are not allowed"),
    ("alice", {"local_user": "root"}, "may not set local_user"),
])
def test_refusals_reach_the_user_as_task_errors(stack, cluster, user: str, config: dict, words: str) -> None:
    endpoint_id, tokens = cluster
    with pytest.raises(TaskFailed, match="could not start your user endpoint") as info:
        _executor(stack, endpoint_id, tokens[user], **config).submit(helpers.square, 2).result(timeout=60)
    assert words in str(info.value)
    events = [json.loads(line) for line in (stack.endpoint_dir("cluster") / "audit.log").read_text().splitlines()]
    mine = [e for e in events if e.get("identity") == user]
    assert any(e["event"] == "refused" for e in mine)
    if user != "alice":  # refused before any process started
        assert not any(e["event"] == "started" for e in mine)


def test_users_read_what_they_may_pass_before_a_task_fails(stack, cluster) -> None:
    endpoint_id, tokens = cluster
    schema = json.loads((stack.endpoint_dir("cluster") / "user_config_schema.json").read_text())
    shown = Client(stack.service_url, tokens["alice"]).endpoint_user_config_schema(endpoint_id)
    assert shown["schema"] == schema and "workers" in shown["variables"]
    assert not {"local_user", "local_home"} & set(shown["variables"])  # the endpoint provides those
    as_alice = {**stack.env, "TETHER_TOKEN": tokens["alice"], "TETHER_SERVICE_URL": stack.service_url}
    out = subprocess.run([sys.executable, "-m", "tether.cli", "endpoint", "show-config-schema", endpoint_id],
                         env=as_alice, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and json.loads(out.stdout) == shown, out.stderr
    # not a multi-user endpoint, or not one you may use: said in words
    with pytest.raises(TetherError, match="not a multi-user endpoint"):
        Client(stack.service_url, stack.token).endpoint_user_config_schema(stack.endpoint_id)
    with pytest.raises(TetherError, match="unknown endpoint"):
        Client(stack.service_url, tokens["alice"]).endpoint_user_config_schema(stack.endpoint_id)
    # and a value the schema refuses names the keys that are allowed
    with pytest.raises(TaskFailed, match="allowed keys: .*workers"):
        _executor(stack, endpoint_id, tokens["alice"], wrokers=1).submit(helpers.square, 2).result(timeout=60)


def test_idle_user_endpoints_stop_and_start_again_on_demand(stack, cluster) -> None:
    endpoint_id, tokens = cluster
    ex = _executor(stack, endpoint_id, tokens["bob"], workers=2)
    assert ex.submit(helpers.square, 3).result(timeout=120) == 9
    client = Client(stack.service_url, tokens["bob"])

    def mine() -> dict:
        return next(u for u in client.list_user_endpoints(endpoint_id) if u["config"] == {"workers": 2})

    wait_for(lambda: mine()["online"], what="bob's user endpoint to be online")
    wait_for(lambda: not mine()["online"], timeout=60, what="bob's idle user endpoint to stop")

    def stopped_cleanly() -> bool:
        lines = (stack.endpoint_dir("cluster") / "audit.log").read_text().splitlines()
        return any(e["event"] == "stopped" and e["user_endpoint_id"] == mine()["endpoint_id"] and e["exit_code"] == 0
                   for e in map(json.loads, lines))

    wait_for(stopped_cleanly, what="the audit log to record the idle stop")
    assert ex.submit(helpers.square, 4).result(timeout=120) == 16  # started again


def test_a_result_kept_by_an_idle_user_endpoint_is_fetched_by_starting_it_again(stack, cluster) -> None:
    """Issue 20: a large result stays with the user endpoint that computed it (as its user, in its
    home); when that endpoint has stopped for idleness, asking for the result starts it again."""
    endpoint_id, tokens = cluster
    ex = _executor(stack, endpoint_id, tokens["bob"], workers=3)
    size = 9 * 1024 * 1024
    fut = ex.submit(bytes, size)
    assert fut.exception(timeout=120) is None
    kept = fut.remote_value()
    assert kept is not None and kept.endpoint != endpoint_id  # kept by bob's user endpoint
    client = Client(stack.service_url, tokens["bob"])

    def mine() -> dict:
        return next(u for u in client.list_user_endpoints(endpoint_id) if u["endpoint_id"] == kept.endpoint)

    wait_for(lambda: not mine()["online"], timeout=60, what="bob's idle user endpoint to stop")
    assert fut.result(timeout=120) == bytes(size)  # it started again to hand the result over
    assert ex.submit(len, fut).result(timeout=120) == size  # and reads it there as an input


def test_render_user_config_previews_the_template(stack, cluster) -> None:
    out = _cli(stack, "endpoint", "render-user-config", "cluster", "--user", "alice", "--config", '{"workers": 3}')
    assert yaml.safe_load(out)["engine"]["workers"] == 3
    bad = subprocess.run([sys.executable, "-m", "tether.cli", "endpoint", "render-user-config", "cluster", "--user",
                          "mallory"], env=stack.env, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "never runs as root" in " ".join(bad.stderr.split())


def test_values_cannot_inject_yaml(tmp_path: Path) -> None:
    """Unit check of the rendering: a value with newlines and YAML syntax stays one string."""
    from tether.endpoint.identity import LocalAccount
    from tether.endpoint.user_config import render

    account = LocalAccount("someone", 1234, 1234, "/home/someone", "/bin/sh")
    text = render("engine:\n  type: htex\n  partition: {{ partition }}\n", {"partition": "debug\nengine: {type: x}"},
                  account, {"id": str(uuid.uuid4()), "username": "someone"}, "cluster")
    assert yaml.safe_load(text) == {"engine": {"type": "htex", "partition": "debug\nengine: {type: x}"}}


def test_a_user_removed_from_the_policy_is_refused_everywhere_below_it(stack, cluster) -> None:
    """Issue 17, item 2: the owner takes bob off ``allowed_users``. His running task fails saying
    why, his user endpoint process ends, and he is refused both at the multi-user endpoint and at
    the id of the user endpoint that was started for him; alice goes on being served."""
    endpoint_id, tokens = cluster
    owner = Client(stack.service_url, stack.token)
    bob = Client(stack.service_url, tokens["bob"])
    ex = _executor(stack, endpoint_id, tokens["bob"], workers=3)
    slow = ex.submit(helpers.sleep_then, 300, "never")
    wait_for(lambda: slow.state == "running", timeout=120, what="bob's slow task to run")
    child = next(u for u in bob.list_user_endpoints(endpoint_id) if u["config"] == {"workers": 3})
    bob_uid = pwd.getpwnam(USERS["bob"]).pw_uid

    def bobs_processes() -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["uids", "cmdline"])
                if p.info["uids"] and p.info["uids"].real == bob_uid]

    assert bobs_processes()
    try:
        owner.set_endpoint_policy(endpoint_id, public=False, users=["alice"])
        with pytest.raises(TaskFailed, match="no longer admits you"):
            slow.result(timeout=60)
        wait_for(lambda: not bobs_processes(), timeout=60, what="bob's user endpoints to stop")
        # sent straight to his user endpoint's id, and through the multi-user endpoint: refused
        direct = Executor(endpoint_id=child["endpoint_id"], service=stack.service_url, token=tokens["bob"])
        with pytest.raises(TetherError, match="no longer admits you"):
            direct.submit(helpers.square, 2).result(timeout=60)
        with pytest.raises(TetherError, match="unknown endpoint"):
            _executor(stack, endpoint_id, tokens["bob"], workers=3).submit(helpers.square, 2).result(timeout=60)
        assert not bobs_processes()
        assert _executor(stack, endpoint_id, tokens["alice"], workers=1).submit(helpers.square, 6).result(
            timeout=120) == 36
    finally:
        owner.set_endpoint_policy(endpoint_id, public=True)
    # admitted again: his user endpoint starts with a new credential
    assert _executor(stack, endpoint_id, tokens["bob"], workers=3).submit(helpers.square, 7).result(timeout=120) == 49


def test_a_user_flooding_their_log_fills_neither_the_disk_nor_the_multi_user_endpoint(stack, cluster) -> None:
    """Issue 17, item 10: 48 MiB printed by one user's task went whole into a root-owned log and
    into the multi-user endpoint's memory. Now the log is cut at ``user_log_max_bytes`` (one
    previous file kept), read at ``user_log_bytes_per_s`` (the flooder waits on its own output),
    its last line is kept, and another user's tasks go on meanwhile."""
    endpoint_id, tokens = cluster
    daemon = psutil.Process(stack.endpoint_pid("cluster"))
    rss_before = daemon.memory_info().rss
    alice = _executor(stack, endpoint_id, tokens["alice"], workers=1)
    assert alice.submit(helpers.square, 2).result(timeout=120) == 4  # her user endpoint is up
    flood = _executor(stack, endpoint_id, tokens["bob"], workers=1).submit(
        helpers.flood_stdout, 8 * LOG_CAP, "END-OF-FLOOD")
    wait_for(lambda: flood.state == "running", timeout=120, what="the flood to start")
    rounds = []
    while not flood.done():
        start = time.monotonic()
        assert alice.submit(helpers.square, 3).result(timeout=60) == 9
        rounds.append(time.monotonic() - start)
    assert flood.result(timeout=120) >= 8 * LOG_CAP
    assert len(rounds) >= 5 and sorted(rounds)[int(len(rounds) * 0.99)] < 0.5, rounds
    child = next(u for u in Client(stack.service_url, tokens["bob"]).list_user_endpoints(endpoint_id)
                 if u["config"] == {"workers": 1})
    log = stack.endpoint_dir("cluster") / "user_endpoints" / f"{child['endpoint_id']}.log"
    previous = log.with_name(log.name + ".1")
    wait_for(lambda: b"END-OF-FLOOD" in log.read_bytes(), what="the flood's last line in the log")
    assert log.stat().st_size <= LOG_CAP and previous.stat().st_size <= LOG_CAP
    assert oct(log.stat().st_mode & 0o777) == "0o600" and oct(previous.stat().st_mode & 0o777) == "0o600"
    assert daemon.memory_info().rss - rss_before < 32 * 1024 * 1024


def test_one_user_cannot_start_more_user_endpoints_than_the_limit(stack, cluster) -> None:
    """Every distinct user_endpoint_config is a process on the shared host: alice asks for four
    at once where the endpoint allows three per user; three run, the fourth is refused in words."""
    endpoint_id, tokens = cluster
    alice = Client(stack.service_url, tokens["alice"])
    uid = pwd.getpwnam(USERS["alice"]).pw_uid
    wait_for(lambda: not any(u["online"] for u in alice.list_user_endpoints(endpoint_id)) and not any(
        p.info["uids"] and p.info["uids"].real == uid for p in psutil.process_iter(["uids"])), timeout=60,
        what="alice's earlier user endpoints to stop when idle")
    audit = stack.endpoint_dir("cluster") / "audit.log"
    wait_for(lambda: _running_per_audit(audit, "alice") == 0, what="the multi-user endpoint to notice")
    futures = [_executor(stack, endpoint_id, tokens["alice"], workers=n).submit(helpers.sleep_then, 3, n)
               for n in (5, 6, 7, 8)]
    outcomes = []
    for f in futures:
        try:
            outcomes.append(f.result(timeout=120))
        except TaskFailed as exc:
            outcomes.append(str(exc))
    refused = [o for o in outcomes if isinstance(o, str)]
    assert len(refused) == 1 and "this endpoint allows 3 per user" in refused[0], outcomes


def _running_per_audit(audit: Path, identity: str) -> int:
    """User endpoints of ``identity`` started and not yet stopped, as the audit log says."""
    running = 0
    for event in map(json.loads, audit.read_text().splitlines()):
        if event.get("identity") == identity and event["event"] in ("started", "stopped"):
            running += 1 if event["event"] == "started" else -1
    return running
