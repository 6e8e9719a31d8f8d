"""Property tests of the service's two surfaces, against a real service process.

* REST: schemathesis generates requests from the service's own OpenAPI document; no answer may
  be a 5xx or break the documented schema (status codes, bodies, headers).
* WebSocket: hypothesis shapes client and endpoint frames, valid and not; every frame the
  protocol refuses is answered with an error frame in words, and the session goes on.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether import Client
from tether.local import LocalStack
from tether.protocol import (
    CLIENT_FRAMES,
    ENDPOINT_FRAMES,
    PROTOCOL_VERSION,
    Error,
    ErrorCode,
    FrameDecoder,
    Hello,
    ProtocolError,
    Received,
    Welcome,
)

from rogue import RawPeer, raw_client, raw_endpoint


@pytest.fixture(scope="module")
def lone_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A service of its own: the REST fuzzer registers and deletes endpoints at will."""
    import os

    home = tmp_path_factory.mktemp("fuzz-home")
    env = {k: v for k, v in os.environ.items() if k not in ("TETHER_SERVICE_URL", "TETHER_TOKEN")}
    env["TETHER_HOME"] = str(home)
    stack = LocalStack(home=home, env=env)
    stack.start_service()
    try:
        yield stack
    finally:
        stack.stop_service()


def test_rest_api_matches_its_openapi_document(lone_service: LocalStack, tmp_path: Path) -> None:
    st_cli = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st_cli, "schemathesis is part of the test extra"
    # a declared blob over the documented maximum size is refused as too large (413), which is what
    # clients turn into PayloadTooLarge: a rejection of invalid data like 400 or 422
    config = tmp_path / "schemathesis.toml"
    config.write_text('[checks.negative_data_rejection]\nexpected-statuses = ["400", "401", "403", "404", "405", '
                      '"406", "409", "413", "415", "422", "428", "429", "5XX"]\n')
    out = subprocess.run(
        [st_cli, "--config-file", str(config), "run", f"{lone_service.service_url}/openapi.json", "--checks", "all",
         "--max-examples", "25",
         "--workers", "1", "--seed", "20261126", "--request-timeout", "20",
         "--header", f"Authorization: Bearer {lone_service.token}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "generated" in out.stdout and " 0 passed" not in out.stdout


# --- WebSocket frames -------------------------------------------------------------------------
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False),
                     st.text(max_size=12), st.binary(max_size=12))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                       max_leaves=12)
_ids = st.one_of(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,10}", fullmatch=True), st.text(max_size=8), _scalars)
_fields = {
    "ids": st.lists(_ids, max_size=5),
    "ref": st.one_of(st.integers(0, 100), _scalars),
    "ts": st.one_of(st.floats(0, 2e9), _scalars),
    "tasks": st.lists(st.dictionaries(st.sampled_from(["id", "function", "endpoint", "payload", "spec"]), _values,
                                      max_size=5), max_size=3),
    "results": st.lists(st.fixed_dictionaries({"id": _ids, "state": st.sampled_from(["success", "failed", "x"])}),
                        max_size=3),
    "functions": st.dictionaries(st.text(max_size=4), _values, max_size=2),
    "capacity": st.one_of(st.dictionaries(st.sampled_from(["workers_total", "tasks_queued", "x"]), _scalars,
                                          max_size=3), _scalars),
    "versions": st.one_of(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2), _scalars),
}
_frames = st.builds(
    lambda t, v, fields: msgpack.packb({"t": t, "v": v, **fields}, use_bin_type=True),
    st.sampled_from(["submit", "subscribe", "cancel", "collected", "received", "running", "result", "heartbeat",
                     "hello", "status", "nonsense", 7]),
    st.sampled_from([PROTOCOL_VERSION, PROTOCOL_VERSION, PROTOCOL_VERSION, 1, "2"]),
    st.dictionaries(st.sampled_from(sorted(_fields)), st.just(None), max_size=4).flatmap(
        lambda keys: st.fixed_dictionaries({k: _fields[k] for k in keys})),
) | st.binary(max_size=24) | st.builds(  # well-formed id frames, so both verdicts are exercised
    lambda t, ids: msgpack.packb({"t": t, "v": PROTOCOL_VERSION, "ids": ids}),
    st.sampled_from(["subscribe", "cancel", "collected", "received", "running"]),
    st.lists(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,10}", fullmatch=True), max_size=3),
)


def _fuzz_session(peer: RawPeer, decoder: FrameDecoder, barrier: Callable[[], list[object]]) -> None:
    """Send hypothesis-shaped frames on one session: each one the protocol refuses must be
    answered with an error frame in words before the barrier's answer, and the session must
    stay up throughout (the barrier needs it)."""
    seen: list[bool] = []

    @settings(max_examples=120, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(frame=_frames)
    def check(frame: bytes) -> None:
        try:
            decoder.decode(frame)
            refused = False
        except ProtocolError:
            refused = True
        seen.append(refused)
        peer.send(frame)
        replies = barrier()
        if refused:
            errors = [m for m in replies if isinstance(m, Error) and m.code == ErrorCode.MALFORMED]
            assert errors and errors[0].message, f"no error frame for a refused frame {frame!r}: {replies}"

    try:
        check()
    finally:
        peer.close()
    assert sum(seen) > 30 and not all(seen), "the fuzzer must try both refused and accepted frames"


def test_every_refused_client_frame_is_answered_in_words(lone_service: LocalStack) -> None:
    peer = raw_client(lone_service.service_url, lone_service.token)
    counter = iter(range(10**9))
    _fuzz_session(peer, FrameDecoder(CLIENT_FRAMES, "a client"), lambda: peer.barrier(str(next(counter))))


def test_every_refused_endpoint_frame_is_answered_in_words(lone_service: LocalStack) -> None:
    cred = Client(lone_service.service_url, lone_service.token).register_endpoint("fuzzed")
    peer = raw_endpoint(lone_service.service_url, cred["endpoint_id"], cred["secret"])
    peer.send(Hello())
    assert isinstance(peer.recv(), Welcome)
    counter = iter(range(10**9))

    def barrier() -> list[object]:
        marker = f"barrier-{next(counter)}"
        peer.send(Received(ids=[marker]))  # not this endpoint's task: refused with the id named
        _, before = peer.recv_until(lambda m: isinstance(m, Error) and marker in (m.ids or []))
        return before

    _fuzz_session(peer, FrameDecoder(ENDPOINT_FRAMES, "an endpoint"), barrier)
