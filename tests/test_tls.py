"""TLS: a service with a certificate from a private CA; clients and endpoints verify it, and
plain http beyond this host is refused (issue 12's TLS part)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether import Client, Executor, TetherError
from tether.errors import ConfigError
from tether.local import LocalStack

import helpers

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None and not os.environ.get("CI"),
                                reason="needs the openssl command to make a test CA (apt-get install openssl)")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private CA and a server certificate for 127.0.0.1 that it signed."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=Tether test CA", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)
    return d


@pytest.fixture(scope="module")
def tls_stack(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    home = tmp_path_factory.mktemp("tls-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env["TETHER_HOME"] = str(home)
    stack = LocalStack(home=home, env=env)
    stack.start_service("--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
                        "--tls-ca", str(pki / "ca.pem"))
    try:
        stack.configure_endpoint("thread", 1)
        stack.start_endpoint()
        yield stack
    finally:
        stack.stop_endpoint()
        stack.stop_service()


def test_tasks_travel_over_verified_tls(tls_stack: LocalStack, pki: Path, monkeypatch) -> None:
    assert tls_stack.service_url.startswith("https://127.0.0.1:")
    monkeypatch.setenv("TETHER_CA_FILE", str(pki / "ca.pem"))
    ex = Executor(endpoint_id=tls_stack.endpoint_id, service=tls_stack.service_url, token=tls_stack.token)
    assert ex.submit(helpers.square, 12).result(timeout=60) == 144  # client and endpoint both on wss://
    assert Client(tls_stack.service_url, tls_stack.token).whoami()["name"] == "local"


def test_an_unverifiable_certificate_is_refused_in_words(tls_stack: LocalStack, monkeypatch) -> None:
    monkeypatch.delenv("TETHER_CA_FILE", raising=False)
    monkeypatch.setenv("TETHER_HOME", "/nonexistent")  # no service.json naming the CA
    with pytest.raises(TetherError, match="certificate.*TETHER_CA_FILE"):
        Client(tls_stack.service_url, tls_stack.token).whoami()
    ex = Executor(endpoint_id=tls_stack.endpoint_id, service=tls_stack.service_url, token=tls_stack.token)
    with pytest.raises(TetherError, match="cannot be verified.*TETHER_CA_FILE"):
        ex.submit(helpers.square, 2).result(timeout=60)


def test_plain_http_beyond_this_host_is_refused(monkeypatch) -> None:
    monkeypatch.delenv("TETHER_ALLOW_INSECURE_HTTP", raising=False)
    with pytest.raises(ConfigError, match="refusing to send credentials over plain http to http://10.0.0.1:8421"):
        Client("http://10.0.0.1:8421", token="t")
    monkeypatch.setenv("TETHER_ALLOW_INSECURE_HTTP", "1")
    assert Client("http://10.0.0.1:8421", token="t").info.url == "http://10.0.0.1:8421"
    out = subprocess.run([sys.executable, "-m", "tether.service.server", "--host", "0.0.0.0", "--port", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "refusing to listen on 0.0.0.0 without TLS" in out.stderr
