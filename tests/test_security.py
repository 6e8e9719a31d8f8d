"""Trust boundaries, attacked over real sockets by a second tenant (issue 6).

Mallory is a second user of the same service, with an endpoint of her own. Each test has her
try one attack with hand-made frames (tests/rogue.py) and checks that the service refuses it
in words and that the victim's work is intact.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import httpx
import pytest
from websockets.sync.server import serve

from tether import AuthError, Client, Executor, TaskFailed, TetherError, UnknownEndpoint
from tether.ids import InvalidIdentifier
from tether.protocol import (
    CLOSE_AUTH_FAILED,
    CLOSE_PROTOCOL,
    ENDPOINT_FRAMES,
    Error,
    ErrorCode,
    Fetch,
    Fetched,
    FrameDecoder,
    Hello,
    Received,
    Release,
    Result,
    Results,
    Running,
    Submit,
    SubmitAck,
    Subscribe,
    Task,
    Tasks,
    Welcome,
    encode,
)
from tether.serialize import function_id, serialize

import helpers
from conftest import pid_alive, wait_for
from rogue import raw, raw_client, raw_endpoint


def _cli(stack, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "tether.cli", *args], env=stack.env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def mallory(stack) -> str:
    """A second user's token."""
    return json.loads(_cli(stack, "service", "user-add", "mallory", "--json"))["token"]


@pytest.fixture
def evil_endpoint(stack, mallory):
    """Mallory's own endpoint, connected by hand (so she controls every frame it sends)."""
    cred = Client(stack.service_url, mallory).register_endpoint(f"evil-{uuid.uuid4().hex[:6]}")
    peer = raw_endpoint(stack.service_url, cred["endpoint_id"], cred["secret"])
    peer.send(Hello())
    assert isinstance(peer.recv(), Welcome)
    yield peer
    peer.close()


def _open(fut) -> None:
    """Wait until the service has stored the task (the ack arrived)."""
    wait_for(lambda: fut.state != "received", what=f"task {fut.task_id} to be stored")


def test_forged_results_and_states_from_another_users_endpoint_are_refused(stack, executor, evil_endpoint) -> None:
    fut = executor.submit(helpers.sleep_then, 1.5, "real")
    _open(fut)
    evil_endpoint.send(Received(ids=[fut.task_id]))
    refused, _ = evil_endpoint.recv_until(lambda m: isinstance(m, Error))
    assert refused.code == ErrorCode.NOT_DISPATCHED and refused.ids == [fut.task_id]
    assert "'received' refused for 1 task(s) that were not dispatched to this endpoint" in refused.message
    evil_endpoint.send(Running(ids=[fut.task_id]))
    evil_endpoint.send(Results(results=[Result(id=fut.task_id, state="success", data=serialize("forged"))]))
    running_refused, _ = evil_endpoint.recv_until(lambda m: isinstance(m, Error))
    result_refused, _ = evil_endpoint.recv_until(lambda m: isinstance(m, Error))
    assert "'running' refused" in running_refused.message and "'result' refused" in result_refused.message
    assert fut.result(timeout=30) == "real"  # the victim's own result, never the forged one
    metrics = httpx.get(stack.service_url + "/metrics", trust_env=False).text
    assert 'tether_task_events_total{event="refused_endpoint_reports"}' in metrics


def test_nobody_else_fetches_or_releases_a_kept_result(stack, executor, evil_endpoint, mallory) -> None:
    """A result kept on the victim's endpoint: Mallory's client and Mallory's endpoint ask for it
    (or release it, or upload a blob in its name) and get nothing; the victim still has it."""
    size = 9 * 1024 * 1024
    fut = executor.submit(bytes, size)
    assert fut.exception(timeout=60) is None and fut.remote_value() is not None
    thief = raw_client(stack.service_url, mallory)
    try:
        thief.send(Fetch(ids=[fut.task_id]))
        answer, _ = thief.recv_until(lambda m: isinstance(m, Fetched))
        assert not answer.data and answer.errors[fut.task_id].code == ErrorCode.UNKNOWN_TASK
        thief.send(Release(ids=[fut.task_id]))
    finally:
        thief.close()
    evil_endpoint.send(Fetch(ids=[fut.task_id]))
    answer, _ = evil_endpoint.recv_until(lambda m: isinstance(m, Fetched))
    assert not answer.data and answer.errors[fut.task_id].code == ErrorCode.UNKNOWN_TASK
    assert "not an input of a task this endpoint holds" in answer.errors[fut.task_id].message
    upload = httpx.post(f"{stack.service_url}/v1/blobs", json={"size": 10, "digest": "0" * 64,
                                                               "task_id": fut.task_id},
                        headers=evil_endpoint.headers, trust_env=False)
    assert upload.status_code == 404
    assert fut.result(timeout=60) == bytes(size)  # released by nobody who may


def test_an_endpoint_cannot_answer_for_a_result_it_was_not_asked_for(stack, executor, evil_endpoint) -> None:
    """Mallory's endpoint offers a blob as the upload of the victim's kept result (which a reader
    would unpickle): the service takes uploads only from the endpoint it asked, naming a blob
    stored as that task's result; the victim gets the real value."""
    from tether.protocol import BlobRef, blob_stub

    size = 9 * 1024 * 1024
    fut = executor.submit(bytes, size)
    assert fut.exception(timeout=60) is None and fut.remote_value() is not None
    forged = blob_stub(BlobRef(id=str(uuid.uuid4()), size=10, digest="0" * 64))
    evil_endpoint.send(Fetched(data={fut.task_id: forged}))
    # frames arrive in order: once a report on an unknown task is refused, the forgery was handled
    evil_endpoint.send(Received(ids=["after-forged-upload"]))
    evil_endpoint.recv_until(lambda m: isinstance(m, Error) and "after-forged-upload" in (m.ids or []))
    assert fut.result(timeout=60) == bytes(size)
    assert executor.submit(len, fut).result(timeout=60) == size


def test_a_reused_task_id_cannot_steal_a_result(stack, executor, mallory) -> None:
    evil_id = Client(stack.service_url, mallory).register_endpoint("thief")["endpoint_id"]
    fut = executor.submit(helpers.sleep_then, 1.0, "the victim's secret")
    _open(fut)
    body = serialize(helpers.identity)
    thief = raw_client(stack.service_url, mallory)
    try:
        thief.send(Submit(ref=1, functions={function_id(body): body},
                          tasks=[Task(id=fut.task_id, function=function_id(body), endpoint=evil_id,
                                      payload=serialize(((1,), {})))]))
        ack, _ = thief.recv_until(lambda m: isinstance(m, SubmitAck))
        assert ack.accepted == []
        assert ack.rejected[fut.task_id].code == ErrorCode.ID_CONFLICT
        assert "already in use" in ack.rejected[fut.task_id].message
        assert fut.result(timeout=30) == "the victim's secret"
        # nothing of the victim's task ever reached the thief's session, and it cannot follow it
        assert not [m for m in thief.barrier("after-result") if isinstance(m, Results)]
        thief.send(Subscribe(ids=[fut.task_id]))
        unknown, _ = thief.recv_until(lambda m: isinstance(m, Error))
        assert unknown.code == ErrorCode.UNKNOWN_TASK and unknown.ids == [fut.task_id]
    finally:
        thief.close()
    r = httpx.get(f"{stack.service_url}/v1/tasks/{fut.task_id}", headers={"Authorization": f"Bearer {mallory}"},
                  trust_env=False)
    assert r.status_code == 404


def test_a_deleted_endpoint_id_is_never_reissued_and_its_tasks_fail_in_words(stack, mallory) -> None:
    victim = Client(stack.service_url, stack.token)
    doomed = victim.register_endpoint("doomed")
    ex = Executor(endpoint_id=doomed["endpoint_id"], service=stack.service_url, token=stack.token)
    fut = ex.submit(helpers.square, 3)  # the endpoint is offline: the task waits for it
    wait_for(lambda: fut.state == "waiting-for-endpoint", what="the task to wait for its endpoint")
    assert victim.delete_endpoint(doomed["endpoint_id"])["tasks_failed"] == 1
    with pytest.raises(TaskFailed, match="was deleted by its owner before this task finished"):
        fut.result(timeout=30)
    with pytest.raises(TetherError, match="409.*not yours to use"):
        Client(stack.service_url, mallory).register_endpoint("mine-now", doomed["endpoint_id"])
    with pytest.raises(TetherError, match="409"):
        victim.register_endpoint("again", doomed["endpoint_id"])
    with pytest.raises(UnknownEndpoint, match="unknown endpoint made-up-id; omit endpoint_id"):
        Client(stack.service_url, mallory).register_endpoint("chosen", "made-up-id")
    old = raw_endpoint(stack.service_url, doomed["endpoint_id"], doomed["secret"])
    try:
        assert old.closed().rcvd.code == CLOSE_AUTH_FAILED
    finally:
        old.close()
    with pytest.raises(UnknownEndpoint, match="deleted"):
        ex.submit(helpers.square, 2).result(timeout=30)


def test_a_function_id_must_be_the_hash_of_its_body(stack) -> None:
    claimed = serialize(lambda x: x * 7)
    forged = serialize(helpers.touch)
    fid = function_id(claimed)
    peer = raw_client(stack.service_url, stack.token)
    try:
        task = Task(id=str(uuid.uuid4()), function=fid, endpoint=stack.endpoint_id, payload=serialize(((2,), {})))
        peer.send(Submit(ref=9, tasks=[task], functions={fid: forged}))
        ack, _ = peer.recv_until(lambda m: isinstance(m, SubmitAck))
        assert ack.rejected[task.id].code == ErrorCode.FUNCTION_ID_MISMATCH
        assert "is not the hash of the body" in ack.rejected[task.id].message
    finally:
        peer.close()
    assert not Client(stack.service_url, stack.token).function_exists(fid)


def test_the_endpoint_checks_function_hashes_and_its_allow_lists(tmp_path: Path) -> None:
    """A rogue *service* (a WebSocket server of the test's) sends a real endpoint daemon a
    function whose body does not match its id, a function off the allow-list, and pickled
    arguments where only JSON is accepted: each task fails in words, the honest one runs."""
    square, cube, other = serialize(helpers.square), serialize(helpers.add), serialize(helpers.identity)
    fid_square, fid_cube, fid_other = function_id(square), function_id(cube), function_id(other)
    home = tmp_path / "home"
    ep_dir = home / "endpoints" / "guarded"
    ep_dir.mkdir(parents=True)
    (ep_dir / "config.yaml").write_text(
        "engine: {type: thread, workers: 1}\nheartbeat_s: 60\nallowed_serialization_methods: [json]\n"
        f"allowed_functions: [{fid_square}, {fid_cube}]\n")
    decoder = FrameDecoder(ENDPOINT_FRAMES, "an endpoint")
    results: dict[str, Result] = {}
    got_all = threading.Event()

    def rogue_service(ws) -> None:
        assert isinstance(decoder.decode(ws.recv()), Hello)
        ws.send(encode(Welcome(endpoint_id="guarded-id")))
        tasks = [
            Task(id="forged-body", function=fid_cube, endpoint="guarded-id", payload=serialize(((2,), {}), "json")),
            Task(id="not-allowed", function=fid_other, endpoint="guarded-id", payload=serialize(((2,), {}), "json")),
            Task(id="pickled-args", function=fid_square, endpoint="guarded-id", payload=serialize(((2,), {}))),
            Task(id="honest", function=fid_square, endpoint="guarded-id", payload=serialize(((3,), {}), "json")),
        ]
        ws.send(encode(Tasks(tasks=tasks, functions={fid_square: square, fid_cube: square, fid_other: other})))
        while len(results) < len(tasks):
            msg = decoder.decode(ws.recv())
            if isinstance(msg, Results):
                results.update({r.id: r for r in msg.results})
        got_all.set()
        ws.recv()  # until the daemon goes

    with serve(rogue_service, "127.0.0.1", 0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.socket.getsockname()[1]
        (ep_dir / "credential.json").write_text(json.dumps(
            {"endpoint_id": "guarded-id", "secret": "s", "service_url": f"http://127.0.0.1:{port}"}))
        env = {**os.environ, "TETHER_HOME": str(home)}
        daemon = subprocess.Popen([sys.executable, "-m", "tether.endpoint.run", "guarded"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert got_all.wait(60), "the endpoint did not answer every task"
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
            server.shutdown()
    assert "does not hash to its id" in results["forged-body"].error.message
    assert "not in this endpoint's allowed_functions" in results["not-allowed"].error.message
    assert "arguments serialized with 'cloudpickle'" in results["pickled-args"].error.message
    assert "data_serializer='json'" in results["pickled-args"].error.message
    assert results["honest"].state == "success"
    assert helpers.square(3) == 9 and serialize(9)[-20:] in results["honest"].data


@pytest.mark.parametrize("blob_threshold", [None, 64], ids=["inline", "blob"])
def test_pickled_arguments_never_load_where_only_json_is_allowed(fresh_stack, tmp_path: Path,
                                                                 blob_threshold: int | None) -> None:
    """An endpoint that runs only its allowed functions on JSON arguments refuses pickled
    arguments whether they come inline or as a blob (downloaded after the daemon's first look):
    the pickle's code never runs, the task fails saying what to do, and JSON still works."""
    marker = tmp_path / "unpickled"
    with Executor(endpoint_id=fresh_stack.endpoint_id, service=fresh_stack.service_url, token=fresh_stack.token,
                  blob_threshold=blob_threshold) as ex:
        allowed = ex.register_function(helpers.identity)
        config = fresh_stack.endpoint_dir() / "config.yaml"
        fresh_stack.stop_endpoint()
        text = config.read_text().replace("allowed_functions: null", f"allowed_functions: [{allowed}]")
        config.write_text(text.replace("allowed_serialization_methods: [cloudpickle]",
                                       "allowed_serialization_methods: [json]"))
        fresh_stack.start_endpoint()
        with pytest.raises(PermissionError, match="data_serializer='json'"):
            ex.submit(helpers.identity, [helpers.RunsWhenLoaded(str(marker)), "x" * 200]).result(timeout=60)
    assert not marker.exists(), "the endpoint unpickled an argument it should have refused"
    with Executor(endpoint_id=fresh_stack.endpoint_id, service=fresh_stack.service_url, token=fresh_stack.token,
                  data_serializer="json", blob_threshold=blob_threshold) as ex:
        assert ex.submit(helpers.identity, ["ok", "y" * 200]).result(timeout=60) == ["ok", "y" * 200]


def test_json_arguments_run_on_an_ordinary_endpoint(executor, stack) -> None:
    ex = Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token,
                  data_serializer="json")
    assert ex.submit(helpers.add, 2, b=5).result(timeout=30) == 7
    with pytest.raises(TetherError, match="plain data"):
        ex.submit(helpers.identity, {1, 2})


def test_path_like_ids_are_refused_where_they_enter(stack) -> None:
    peer = raw_client(stack.service_url, stack.token)
    body = serialize(helpers.square)
    try:
        peer.send(raw("submit", ref=3, functions={}, tasks=[
            {"id": "../../../tmp/x", "function": function_id(body), "endpoint": stack.endpoint_id, "payload": b""}]))
        err, _ = peer.recv_until(lambda m: isinstance(m, Error))
        assert err.code == ErrorCode.MALFORMED and "$.tasks[0].id" in err.message
    finally:
        peer.close()
    with httpx.Client(base_url=stack.service_url, headers={"Authorization": f"Bearer {stack.token}"},
                      trust_env=False) as http:
        r = http.post("/v1/tasks", json={"tasks": [{"task_id": "../x", "endpoint_id": stack.endpoint_id,
                                                    "function_id": function_id(body), "payload": ""}]})
        assert r.status_code == 422 and "task_id" in str(r.json()["detail"])
        assert http.get("/v1/task_groups/..%2F..").status_code in (404, 422)
    with pytest.raises(InvalidIdentifier, match="task group id '../x'"):
        Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token, task_group_id="../x")
    with pytest.raises(InvalidIdentifier, match="endpoint id 'a/b'"):
        Executor(endpoint_id="a/b", service=stack.service_url, token=stack.token)


def test_malformed_subscribes_cannot_break_the_store_for_others(stack, executor) -> None:
    peer = raw_client(stack.service_url, stack.token)
    try:
        peer.send(raw("subscribe", ids=[1, {"x": 2}]))
        err, _ = peer.recv_until(lambda m: isinstance(m, Error))
        assert err.code == ErrorCode.MALFORMED and "Expected `str`" in err.message
        peer.send(raw("subscribe", ids=[f"id-{i}" for i in range(10_001)]))
        err, _ = peer.recv_until(lambda m: isinstance(m, Error))
        assert "length <= 10000" in err.message
        ids = [f"nope-{i}" for i in range(10_000)]  # the most one frame may carry: answered, in chunks
        peer.send(Subscribe(ids=ids))
        err, _ = peer.recv_until(lambda m: isinstance(m, Error))
        assert err.code == ErrorCode.UNKNOWN_TASK and len(err.ids) == 10_000
    finally:
        peer.close()
    # every write still works at once: submits, results, REST registrations
    assert executor.submit(helpers.square, 6).result(timeout=30) == 36
    assert Client(stack.service_url, stack.token).register_function(helpers.add)


def test_a_failed_statement_rolls_back_and_the_store_keeps_working(tmp_path: Path) -> None:
    from tether.service.store import Store

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with pytest.raises(Exception):  # noqa: B017 - whatever the driver raises for an unbindable value
        store.get_tasks("someone", [object()])  # type: ignore[list-item]
    assert not store._conn.in_transaction()
    user_id, token = store.create_user("after")
    assert store.user_by_token(token) == user_id
    store.close()


def test_huge_id_lists_are_refused_at_the_edge(stack, evil_endpoint) -> None:
    # 400,000 ids: under this test service's frame limit (a bigger frame is closed with 1009 by the
    # WebSocket layer), far over the protocol's bound on ids per frame
    evil_endpoint.send(raw("received", ids=[str(i) for i in range(400_000)], ts=1.0))
    err, _ = evil_endpoint.recv_until(lambda m: isinstance(m, Error))
    assert err.code == ErrorCode.MALFORMED and "length <= 10000" in err.message
    assert httpx.get(stack.service_url + "/healthz", trust_env=False, timeout=5).json()["status"] == "ok"


def test_a_made_up_hello_neither_stalls_the_service_nor_is_believed(stack, executor, mallory) -> None:
    """Mallory's endpoint claims to hold 400,000 tasks, then the most a hello may list (with a
    window of two): the first is refused at the edge, the second cut to what it could hold, and
    meanwhile another tenant's round trips and /healthz stay quick."""
    import time

    cred = Client(stack.service_url, mallory).register_endpoint(f"liar-{uuid.uuid4().hex[:6]}")
    liar = raw_endpoint(stack.service_url, cred["endpoint_id"], cred["secret"])
    try:
        liar.send(raw("hello", inflight=[f"t{i}" for i in range(400_000)]))
        err, _ = liar.recv_until(lambda m: isinstance(m, Error))
        assert err.code == ErrorCode.MALFORMED and "length <= 10000" in err.message
    finally:
        liar.close()
    liar = raw_endpoint(stack.service_url, cred["endpoint_id"], cred["secret"])
    try:
        liar.send(raw("hello", capacity={"workers_total": 2}, inflight=[f"t{i}" for i in range(10_000)],
                      spooled=[f"s{i}" for i in range(10_000)]))
        assert isinstance(liar.recv(), Welcome)
        worst = 0.0
        for i in range(20):  # the bystander
            t0 = time.perf_counter()
            assert executor.submit(helpers.square, i).result(timeout=30) == i * i
            assert httpx.get(stack.service_url + "/healthz", trust_env=False, timeout=5).status_code == 200
            worst = max(worst, time.perf_counter() - t0)
        assert worst < 2.0, f"another tenant waited {worst:.2f} s"
    finally:
        liar.close()


def _post_raw(url: str, path: str, headers: dict[str, str], send_bytes: int) -> tuple[str, int]:
    """POST over a bare socket announcing a 1 GiB body and pushing ``send_bytes`` of it: (the
    status line the service answered, how many bytes it took before it answered and closed)."""
    import socket
    from urllib.parse import urlsplit

    host, port = urlsplit(url).hostname, urlsplit(url).port
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": host, "Content-Type": "application/json",
                                                  "Content-Length": str(1 << 30), **headers}.items())
    sent = 0
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode())
        chunk = b"x" * (1 << 20)
        try:
            while sent < send_bytes:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:  # the service answered and closed: what we want
            pass
        answer = sock.recv(4096).decode(errors="replace")
    return answer.split("\r\n", 1)[0], sent


@pytest.mark.parametrize("auth", [None, "Bearer not-a-token", "Bearer VALID"],
                         ids=["anonymous", "bad-token", "too-large"])
def test_bodies_are_not_read_before_the_sender_is_known_and_its_size_allowed(stack, executor, auth: str | None) -> None:
    """Anonymous or wrongly authenticated POSTs announcing 1 GiB, and an authenticated one
    announcing more than any request may carry, are answered before their bodies are read: the
    service does not grow by what they push, and another tenant's work goes on."""
    import psutil

    service = psutil.Process(stack.service_pid())
    before = service.memory_info().rss
    headers = {} if auth is None else {"Authorization": auth.replace("VALID", stack.token)}
    status, _ = _post_raw(stack.service_url, "/v1/tasks", headers, send_bytes=100 << 20)
    assert status.split()[1] == ("413" if auth == "Bearer VALID" else "401"), status
    grown = service.memory_info().rss - before
    assert grown < 32 << 20, f"the service grew by {grown >> 20} MiB reading a body it refused"
    assert executor.submit(helpers.square, 6).result(timeout=30) == 36


def test_bad_heartbeats_and_hellos_never_reach_shared_views(stack, executor, mallory, evil_endpoint) -> None:
    evil_endpoint.send(raw("heartbeat", capacity="x", versions={}))
    evil_endpoint.send(raw("heartbeat", capacity={"workers_total": "x"}, versions={}))
    first, _ = evil_endpoint.recv_until(lambda m: isinstance(m, Error))
    second, _ = evil_endpoint.recv_until(lambda m: isinstance(m, Error))
    assert "$.capacity" in first.message and "'workers_total' must be a count" in second.message
    cred = Client(stack.service_url, mallory).register_endpoint("bad-hello")
    bad = raw_endpoint(stack.service_url, cred["endpoint_id"], cred["secret"])
    try:
        bad.send(raw("hello", versions="x"))
        err = bad.recv()
        assert isinstance(err, Error) and err.fatal and "$.versions" in err.message
        closed = bad.closed()
        assert closed.rcvd.code == CLOSE_PROTOCOL and "versions" in closed.rcvd.reason
    finally:
        bad.close()
    assert httpx.get(stack.service_url + "/metrics", trust_env=False).status_code == 200
    assert len(Client(stack.service_url, mallory).list_endpoints()) >= 1
    assert executor.submit(helpers.square, 7).result(timeout=30) == 49


def test_token_rotation_and_revocation_take_effect_at_once(stack) -> None:
    first = json.loads(_cli(stack, "service", "user-add", "rotator", "--json"))["token"]
    ex = Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=first)
    with pytest.raises(TetherError):  # rotator owns no endpoint: refused, but the session is up
        ex.submit(helpers.square, 1).result(timeout=30)
    pending = ex.submit(helpers.square, 2)
    second = json.loads(_cli(stack, "service", "user-add", "rotator", "--json"))["token"]
    with pytest.raises((AuthError, TetherError)):
        pending.result(timeout=30)
    with pytest.raises(AuthError, match="invalid token"):
        Client(stack.service_url, first).whoami()
    assert Client(stack.service_url, second).whoami()["name"] == "rotator"
    _cli(stack, "service", "token-revoke", "rotator")
    with pytest.raises(AuthError):
        Client(stack.service_url, second).whoami()


def test_endpoint_credential_rotation_keeps_a_running_endpoint_serving(stack) -> None:
    stack.configure_endpoint("thread", 1, name="rotating")
    endpoint_id = stack.start_endpoint("rotating")
    try:
        old = json.loads((stack.endpoint_dir("rotating") / "credential.json").read_text())
        pid = stack.endpoint_pid("rotating")
        _cli(stack, "endpoint", "rotate-credential", "rotating")
        new = json.loads((stack.endpoint_dir("rotating") / "credential.json").read_text())
        assert new["secret"] != old["secret"] and new["endpoint_id"] == endpoint_id
        assert oct((stack.endpoint_dir("rotating") / "credential.json").stat().st_mode & 0o777) == "0o600"
        ex = Executor(endpoint_id=endpoint_id, service=stack.service_url, token=stack.token)
        assert ex.submit(helpers.square, 8).result(timeout=60) == 64  # the daemon reconnected with the new one
        assert pid_alive(pid)
        stale = raw_endpoint(stack.service_url, endpoint_id, old["secret"])
        try:
            assert stale.closed().rcvd.code == CLOSE_AUTH_FAILED
        finally:
            stale.close()
    finally:
        stack.stop_endpoint("rotating")


def test_a_payload_posing_as_the_daemons_own_stub_is_refused(stack, tmp_path: Path) -> None:
    """The daemon hands large arguments to its workers as stubs: a local file to unpickle, or a
    service blob to read with the endpoint's credential. A payload from the wire that poses as
    one is refused like any method the endpoint does not accept: no worker reads the file or
    asks the URL it names."""
    import base64
    import socket

    from tether.protocol import BlobRef
    from tether.transfer import file_stub, service_stub

    listener = socket.create_server(("127.0.0.1", 0))  # would see a worker that followed the stub
    listener.setblocking(False)
    secret = tmp_path / "not-yours.pickle"
    secret.write_bytes(serialize(((7,), {})))
    ref = BlobRef(id=str(uuid.uuid4()), size=10, digest="0" * 64)
    forged = [file_stub(secret), service_stub(f"http://127.0.0.1:{listener.getsockname()[1]}",
                                              {"Authorization": "Bearer stolen"}, None, ref)]
    with httpx.Client(base_url=stack.service_url, headers={"Authorization": f"Bearer {stack.token}"},
                      trust_env=False, timeout=30) as http:
        fid = http.post("/v1/functions", json={"function": base64.b64encode(serialize(helpers.square)).decode()})
        tids = [str(uuid.uuid4()) for _ in forged]
        answer = http.post("/v1/tasks", json={"tasks": [
            {"task_id": tid, "endpoint_id": stack.endpoint_id, "function_id": fid.json()["function_id"],
             "payload": base64.b64encode(stub).decode()} for tid, stub in zip(tids, forged, strict=True)]})
        assert answer.status_code == 200 and sorted(answer.json()["accepted"]) == sorted(tids), answer.text
        for tid in tids:
            assert wait_for(lambda tid=tid: http.get(f"/v1/tasks/{tid}").json()["state"] == "failed", timeout=60)
            assert "which this endpoint does not accept" in json.dumps(http.get(f"/v1/tasks/{tid}").json()["error"])
    with pytest.raises(BlockingIOError):
        listener.accept()
    listener.close()
