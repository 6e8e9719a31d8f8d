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
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import pytest

from tether import AuthError, Client, Executor, TetherError
from tether.local import LocalStack

import helpers

CLIENT_ID = "6b5b0f2e-tether-service"
SECRET = "s3cret"
SCOPE = "https://auth.globus.org/scopes/tether/all"
ALICE = {"sub": "2b9c6c3e-0c4a-4f63-9d55-7c2f5f8e1a10", "username": "alice@example.org"}


NATIVE_APP = "0e3f5b2a-native-app"


class FakeGlobusAuth(BaseHTTPRequestHandler):
    """Globus Auth's three token routes, as globus-sdk calls them."""

    tokens: dict[str, dict] = {}
    calls: list[str] = []
    codes: dict[str, str] = {}  # authorization code -> the access token it yields
    revoked: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        form = {k: v[0] for k, v in parse_qs(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode())
                .items()}
        if self.path.rstrip("/").endswith("/v2/oauth2/token/introspect"):
            expected = "Basic " + base64.b64encode(f"{CLIENT_ID}:{SECRET}".encode()).decode()
            if self.headers.get("Authorization") != expected:
                self._answer(401, {"error": "invalid_client"})
                return
            token = form.get("token", "")
            self.calls.append(token)
            info = self.tokens.get(token)
            self._answer(200, {"active": False} if info is None else {"active": True, **info})
        elif self.path.rstrip("/").endswith("/v2/oauth2/token/revoke"):
            self.revoked.append(form.get("token", ""))
            self.tokens.pop(form.get("token", ""), None)
            self._answer(200, {"active": False})
        elif self.path.rstrip("/").endswith("/v2/oauth2/token"):
            access = self.codes.get(form.get("code", ""))
            if form.get("grant_type") != "authorization_code" or form.get("client_id") != NATIVE_APP or not access:
                self._answer(400, {"error": "invalid_grant"})
                return
            self._answer(200, {"access_token": access, "expires_in": 3600, "resource_server": CLIENT_ID,
                               "scope": SCOPE, "token_type": "Bearer", "refresh_token": access + "-refresh",
                               "state": "_default", "other_tokens": []})
        else:
            self._answer(404, {"error": "not_found"})

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
    FakeGlobusAuth.auth_url = f"http://127.0.0.1:{server.server_port}/"
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


def test_an_authentication_policy_admits_by_domain_and_recent_sign_in(globus_stack) -> None:
    """An endpoint's ``authentication_policy`` is checked by the service before a task reaches it:
    an identity of another domain, or a session older than allowed, is refused in words; the
    same user signed in recently runs tasks."""
    stack, auth = globus_stack
    now = time.time()
    dave = {"sub": "d4d4d4d4-1111-4222-8333-444455556666", "username": "dave@lab.example.org", "scope": SCOPE,
            "exp": now + 3600}

    def signed_in(ago: float) -> dict:
        return {"session_id": "s", "authentications": {dave["sub"]: {"auth_time": int(now - ago), "idp": "lab"}}}

    auth.tokens["dave-fresh"] = {**dave, "session_info": signed_in(60)}
    auth.tokens["dave-stale"] = {**dave, "session_info": signed_in(7200)}
    env = {**stack.env, "TETHER_SERVICE_URL": stack.service_url, "TETHER_TOKEN": "dave-fresh"}
    owner = LocalStack(home=stack.home, env=env, service_url=stack.service_url, token="dave-fresh", port=stack.port)
    owner.configure_endpoint("thread", 1, name="guarded")
    config = owner.endpoint_dir("guarded") / "config.yaml"
    original = config.read_text()
    config.write_text(original + "authentication_policy: {allowed_domains: [example.org], max_session_age_s: 600}\n")
    endpoint_id = owner.start_endpoint("guarded")
    try:
        with Executor(endpoint_id=endpoint_id, service=stack.service_url, token="dave-fresh") as ex:
            assert ex.submit(helpers.square, 7).result(timeout=60) == 49  # a subdomain of example.org, just signed in
        with Executor(endpoint_id=endpoint_id, service=stack.service_url, token="dave-stale") as ex:
            with pytest.raises(TetherError, match=r"requires an identity from example.org and a sign-in within the "
                                                  r"last 600 s; you signed in 72\d\d s ago: sign in again"):
                ex.submit(helpers.square, 7).result(timeout=60)
        owner.stop_endpoint("guarded")
        config.write_text(original + "authentication_policy: {allowed_domains: [other.org]}\n")
        owner.start_endpoint("guarded")
        with Executor(endpoint_id=endpoint_id, service=stack.service_url, token="dave-fresh") as ex:
            with pytest.raises(TetherError, match="your identity is 'dave@lab.example.org': sign in with an identity "
                                                  "from other.org"):
                ex.submit(helpers.square, 7).result(timeout=60)
        owner.stop_endpoint("guarded")
        config.write_text(original)  # the policy taken out of config.yaml: gone at the next start
        owner.start_endpoint("guarded")
        with Executor(endpoint_id=endpoint_id, service=stack.service_url, token="dave-stale") as ex:
            assert ex.submit(helpers.square, 8).result(timeout=60) == 64
    finally:
        owner.stop_endpoint("guarded")


def test_login_whoami_logout_with_the_native_app_flow(globus_stack, tmp_path: Path) -> None:
    """``tether login`` as a user runs it: a URL to open, a code pasted back, tokens kept by
    globus-sdk's storage and used for that service only; ``logout`` revokes them."""
    stack, auth = globus_stack
    auth.codes["code-from-browser"] = "carol-token"
    auth.tokens["carol-token"] = {"sub": "11111111-2222-4333-8444-555555555555", "username": "carol@example.org",
                                  "scope": SCOPE, "exp": time.time() + 3600}
    env = {k: v for k, v in stack.env.items() if not k.startswith("TETHER_")}
    env["TETHER_HOME"] = str(tmp_path / "carol-home")

    def tether(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tether.cli", *args], env=env, input=stdin, capture_output=True,
                              text=True, timeout=60)

    out = tether("login", "--service", stack.service_url, "--globus-client-id", NATIVE_APP, "--scope", SCOPE,
                 "--globus-auth-url", auth.auth_url, stdin="code-from-browser\n")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "v2/oauth2/authorize" in out.stdout and f"logged in to {stack.service_url}" in out.stdout
    for name in ("logins.json", "globus_tokens.json"):
        assert oct((tmp_path / "carol-home" / name).stat().st_mode & 0o777) == "0o600"
    me = tether("whoami", "--service", stack.service_url, "--json")
    assert me.returncode == 0, me.stderr
    assert json.loads(me.stdout)["name"] == "carol@example.org"
    other = tether("whoami", "--service", "https://elsewhere.example.org")
    assert other.returncode != 0 and "no token for the service https://elsewhere.example.org" in " ".join(
        other.stderr.split())
    bad = tether("login", "--service", stack.service_url, "--globus-client-id", NATIVE_APP, "--scope", SCOPE,
                 "--globus-auth-url", auth.auth_url, stdin="wrong-code\n")
    assert bad.returncode != 0 and "Globus Auth refused the login" in " ".join(bad.stderr.split())
    assert tether("logout", "--service", stack.service_url).returncode == 0
    assert "carol-token" in auth.revoked
    gone = tether("whoami", "--service", stack.service_url)
    assert gone.returncode != 0 and "tether login" in " ".join(gone.stderr.split())
