"""Bad input gets an error in words, and the service keeps serving everyone else."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import msgpack
import pytest

from tether import AuthError, Client, Executor, PayloadTooLarge, UnknownEndpoint
from tether.protocol import CLIENT_WS_PATH, Msg, decode, encode
from tether.transport import open_ws

import helpers
from conftest import TEST_MAX_PAYLOAD, wait_for


def test_wrong_token_is_an_auth_error(stack) -> None:
    ex = Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token="not-a-token")
    with pytest.raises(AuthError, match="token"):
        ex.submit(helpers.square, 2).result(timeout=30)
    with pytest.raises(AuthError, match="invalid token"):
        Client(stack.service_url, "not-a-token").whoami()
    r = httpx.get(stack.service_url + "/v1/endpoints", trust_env=False)
    assert r.status_code == 401 and "Authorization" in r.json()["detail"]


def test_unknown_endpoint_is_rejected_at_submit(stack, executor: Executor) -> None:
    ex = Executor(endpoint_id="00000000-0000-0000-0000-000000000000", service=stack.service_url, token=stack.token)
    with pytest.raises(UnknownEndpoint, match="unknown endpoint 00000000"):
        ex.submit(helpers.square, 2).result(timeout=30)
    assert executor.submit(helpers.square, 3).result(timeout=30) == 9


def test_oversized_payload_is_refused_in_words(executor: Executor) -> None:
    executor.submit(helpers.square, 1).result(timeout=30)  # connected: the client knows the limit
    with pytest.raises(PayloadTooLarge, match=str(TEST_MAX_PAYLOAD)):
        executor.submit(helpers.identity, b"x" * (TEST_MAX_PAYLOAD + 1))
    assert executor.submit(helpers.square, 4).result(timeout=30) == 16


def test_malformed_frames_get_errors_and_the_session_survives(stack, executor: Executor) -> None:
    async def scenario() -> list[dict]:
        url = stack.service_url.replace("http", "ws", 1) + CLIENT_WS_PATH
        ws = await open_ws(url, {"Authorization": f"Bearer {stack.token}"})
        assert decode(await ws.recv())["t"] == Msg.WELCOME
        replies = []
        for bad in (b"\xc1\xc1 not msgpack", msgpack.packb([1, 2, 3]), msgpack.packb({"v": 99, "t": "submit"}),
                    encode("no-such-type"), encode(Msg.SUBMIT, ref=7)):
            await ws.send(bad)
            replies.append(decode(await ws.recv()))
        # the same session still works after all that
        await ws.send(encode(Msg.SUBSCRIBE, ids=["nope"]))
        replies.append(decode(await ws.recv()))
        await ws.close()
        return replies

    replies = asyncio.run(scenario())
    assert [r["t"] for r in replies] == ["error"] * 6
    assert "not valid msgpack" in replies[0]["message"]
    assert "must be a msgpack map" in replies[1]["message"]
    assert "protocol version 99" in replies[2]["message"]
    assert "unknown message type" in replies[3]["message"]
    assert "needs field 'tasks'" in replies[4]["message"] and replies[4]["ref"] == 7
    assert "unknown task ids" in replies[5]["message"]
    assert executor.submit(helpers.square, 5).result(timeout=30) == 25


def test_config_with_a_wrong_key_is_reported_with_file_key_and_hint(stack, tmp_path: Path) -> None:
    env = dict(stack.env)
    cfg_dir = stack.home / "endpoints" / "typo"
    cfg_dir.mkdir(parents=True)
    (cfg_dir / "config.yaml").write_text("engine:\n  type: proces\n  wokers: 2\nheartbeat: 5\n")
    out = subprocess.run([sys.executable, "-m", "tether.cli", "endpoint", "start", "typo"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    text = " ".join(out.stderr.split())
    assert str(cfg_dir / "config.yaml") in text
    assert "engine.type: 'proces' is not one of thread, process" in text
    assert "(did you mean 'process'?)" in text
    assert "unknown key 'wokers' (did you mean 'workers'?)" in text
    assert "unknown key 'heartbeat' (did you mean 'heartbeat_s'?)" in text


def test_rest_validation_errors_say_what_is_wrong(stack) -> None:
    with httpx.Client(base_url=stack.service_url, headers={"Authorization": f"Bearer {stack.token}"},
                      trust_env=False) as http:
        r = http.post("/v1/endpoints", json={"name": "bad name with spaces"})
        assert r.status_code == 422
        assert "name" in str(r.json()["detail"])
        r = http.post("/v1/functions", json={"function": "%%%"})
        assert r.status_code == 422 and "base64" in r.json()["detail"]
        assert http.get("/v1/tasks/unknown").status_code == 404
        assert http.get("/healthz").json()["status"] == "ok"


def test_python_version_mismatch_is_reported_before_any_task_runs(stack) -> None:
    """A (scripted) endpoint that says it runs Python 3.9: the client warns at submit, in words."""
    from tether.protocol import ENDPOINT_WS_PATH
    from tether.serialize import PY_VERSION

    cred = Client(stack.service_url, stack.token).register_endpoint("old-python")
    url = stack.service_url.replace("http", "ws", 1) + ENDPOINT_WS_PATH
    connected = threading.Event()
    done = threading.Event()

    async def old_endpoint() -> None:
        ws = await open_ws(url, {"Authorization": f"Bearer {cred['secret']}", "X-Tether-Endpoint": cred["endpoint_id"]})
        await ws.send(encode(Msg.HELLO, versions={"python": "3.9"}, inflight=[], spooled=[]))
        assert decode(await ws.recv())["t"] == Msg.WELCOME
        connected.set()
        await asyncio.get_running_loop().run_in_executor(None, done.wait, 30)
        await ws.close()

    thread = threading.Thread(target=asyncio.run, args=(old_endpoint(),))
    thread.start()
    try:
        assert connected.wait(30)
        ex = Executor(endpoint_id=cred["endpoint_id"], service=stack.service_url, token=stack.token)
        with pytest.warns(RuntimeWarning) as record:
            fut = ex.submit(helpers.square, 2)
            wait_for(lambda: fut.state == "waiting-for-endpoint" or record, what="the submission to be acknowledged")
            wait_for(lambda: len(record) > 0, what="the version warning")
        text = str(record[0].message)
        assert "Python 3.9" in text and f"Python {PY_VERSION}" in text
        fut.cancel()
    finally:
        done.set()
        thread.join(30)
