"""Bad input gets an error in words, and the service keeps serving everyone else."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import msgpack
import pytest

from tether import AuthError, Client, Executor, PayloadTooLarge, UnknownEndpoint
from tether.protocol import Error, ErrorCode, Hello, Subscribe, Welcome

import helpers
from conftest import TEST_MAX_PAYLOAD, wait_for
from rogue import raw, raw_client, raw_endpoint


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


def test_oversized_payload_is_refused_in_words(stack, executor: Executor) -> None:
    executor.submit(helpers.square, 1).result(timeout=30)  # connected: the client knows the limit
    # a client that keeps every payload inline (no blobs) is refused at submit, in words
    inline_only = Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token,
                           blob_threshold=2**40)
    with pytest.raises(PayloadTooLarge, match=str(TEST_MAX_PAYLOAD)):
        inline_only.submit(helpers.identity, b"x" * (TEST_MAX_PAYLOAD + 1))
    # by default a payload over the inline limit travels as a blob (docs/payloads.md)
    assert executor.submit(helpers.identity, b"x" * (TEST_MAX_PAYLOAD + 1)).result(timeout=60) == \
        b"x" * (TEST_MAX_PAYLOAD + 1)
    assert executor.submit(helpers.square, 4).result(timeout=30) == 16


def test_malformed_frames_get_errors_and_the_session_survives(stack, executor: Executor) -> None:
    peer = raw_client(stack.service_url, stack.token)
    replies = []
    try:
        for bad in (b"\xc1\xc1 not msgpack", msgpack.packb([1, 2, 3]), msgpack.packb({"v": 99, "t": "submit"}),
                    raw("no-such-type"), raw("submit", ref=7)):
            peer.send(bad)
            replies.append(peer.recv())
        peer.send(Subscribe(ids=["nope"]))  # the same session still works after all that
        replies.append(peer.recv())
    finally:
        peer.close()
    assert all(isinstance(r, Error) for r in replies)
    assert [r.code for r in replies] == [ErrorCode.MALFORMED] * 5 + [ErrorCode.UNKNOWN_TASK]
    assert "not a msgpack map" in replies[0].message
    assert "not a msgpack map" in replies[1].message
    assert "protocol version 99" in replies[2].message
    assert "'no-such-type' is not a message a client may send" in replies[3].message
    assert "Object missing required field `tasks`" in replies[4].message
    assert replies[4].ref == 7  # the refusal names the batch, so a client fails it instead of resending it
    assert "unknown task ids" in replies[5].message
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
        assert r.status_code == 422 and "function" in str(r.json()["detail"]) and "pattern" in r.text
        assert http.get("/v1/tasks/unknown").status_code == 404
        assert http.get("/healthz").json()["status"] == "ok"


def test_python_version_mismatch_is_reported_before_any_task_runs(stack) -> None:
    """A (scripted) endpoint that says it runs Python 3.9: the client warns at submit, in words."""
    from tether.serialize import PY_VERSION

    cred = Client(stack.service_url, stack.token).register_endpoint("old-python")
    old = raw_endpoint(stack.service_url, cred["endpoint_id"], cred["secret"])
    try:
        old.send(Hello(versions={"python": "3.9"}))
        assert isinstance(old.recv(), Welcome)
        ex = Executor(endpoint_id=cred["endpoint_id"], service=stack.service_url, token=stack.token)
        with pytest.warns(RuntimeWarning) as record:
            fut = ex.submit(helpers.square, 2)
            wait_for(lambda: fut.state == "waiting-for-endpoint" or record, what="the submission to be acknowledged")
            wait_for(lambda: len(record) > 0, what="the version warning")
        text = str(record[0].message)
        assert "Python 3.9" in text and f"Python {PY_VERSION}" in text
        fut.cancel()
    finally:
        old.close()
