"""Globus Auth tokens, validated by introspection with the service's own client credentials.

Globus Auth's servers cannot exist here, so a small HTTP server plays them (the one mock the
project allows): it answers ``POST /v2/oauth2/token/introspect`` as Globus does, and only to the
service's client id and secret. Everything else is real: the service process, globus-sdk
making the call, the client and the endpoint.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import pytest

from tether import AuthError, Client, Executor
from tether.local import LocalStack

import helpers

CLIENT_ID = "6b5b0f2e-tether-service"
SECRET = "s3cret"
SCOPE = "https://auth.globus.org/scopes/tether/all"
ALICE = {"sub": "2b9c6c3e-0c4a-4f63-9d55-7c2f5f8e1a10", "username": "alice@example.org"}


class FakeGlobusAuth(BaseHTTPRequestHandler):
    tokens: dict[str, dict] = {}
    calls: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        expected = "Basic " + base64.b64encode(f"{CLIENT_ID}:{SECRET}".encode()).decode()
        if self.headers.get("Authorization") != expected:
            self._answer(401, {"error": "invalid_client"})
            return
        form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode())
        token = form.get("token", [""])[0]
        self.calls.append(token)
        info = self.tokens.get(token)
        self._answer(200, {"active": False} if info is None else {"active": True, **info})

    def _answer(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def globus_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, type[FakeGlobusAuth]]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeGlobusAuth)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    home = tmp_path_factory.mktemp("globus-home")
    secret = home / "globus-secret"
    secret.write_text(SECRET)
    secret.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env["TETHER_HOME"] = str(home)
    stack = LocalStack(home=home, env=env)
    stack.start_service("--globus-client-id", CLIENT_ID, "--globus-client-secret-file", str(secret),
                        "--globus-scope", SCOPE, "--globus-auth-url", f"http://127.0.0.1:{server.server_port}/")
    try:
        yield stack, FakeGlobusAuth
    finally:
        stack.stop_service()
        server.shutdown()


def test_a_globus_identity_is_a_user_keyed_by_its_identity_id(globus_stack) -> None:
    stack, auth = globus_stack
    auth.tokens["alice-token"] = {**ALICE, "scope": SCOPE, "exp": time.time() + 3600, "client_id": "some-app"}
    alice = Client(stack.service_url, "alice-token")
    assert alice.whoami() == {"user_id": ALICE["sub"], "name": "alice@example.org"}
    # alice's own endpoint, registered and run with her Globus token
    cred = alice.register_endpoint("alices-laptop")
    assert cred["endpoint_id"]
    assert Client(stack.service_url, stack.token).list_endpoints() == []  # the local admin does not see it
    calls = len(auth.calls)
    for _ in range(5):
        alice.whoami()
    assert len(auth.calls) == calls, "introspection answers are cached, not asked per request"


def test_inactive_expired_and_unscoped_tokens_are_refused(globus_stack) -> None:
    stack, auth = globus_stack
    auth.tokens["expired"] = {**ALICE, "scope": SCOPE, "exp": time.time() - 10}
    auth.tokens["other-scope"] = {**ALICE, "scope": "urn:globus:auth:scope:transfer.api.globus.org:all",
                                  "exp": time.time() + 3600}
    for token in ("never-issued", "expired", "other-scope"):
        with pytest.raises(AuthError, match="invalid token"):
            Client(stack.service_url, token).whoami()
    assert Client(stack.service_url, stack.token).whoami()["name"] == "local"  # the service's own tokens still work


def test_a_globus_user_runs_tasks_on_their_endpoint(globus_stack, tmp_path: Path) -> None:
    stack, auth = globus_stack
    auth.tokens["bob-token"] = {"sub": "7d3f9a52-aaaa-4bbb-8ccc-0123456789ab", "username": "bob@example.org",
                                "scope": SCOPE, "exp": time.time() + 3600}
    bob_env = {**stack.env, "TETHER_SERVICE_URL": stack.service_url, "TETHER_TOKEN": "bob-token"}
    bob = LocalStack(home=stack.home, env=bob_env, service_url=stack.service_url, token="bob-token",
                     port=stack.port)
    bob.configure_endpoint("thread", 1, name="bobs")
    endpoint_id = bob.start_endpoint("bobs")
    try:
        ex = Executor(endpoint_id=endpoint_id, service=stack.service_url, token="bob-token")
        assert ex.submit(helpers.square, 9).result(timeout=60) == 81
    finally:
        bob.stop_endpoint("bobs")
