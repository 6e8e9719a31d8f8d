"""TLS: a service with a certificate from a private CA; clients and endpoints verify it, and
plain http beyond this host is refused (issue 12's TLS part).

Two ways to make the CA: trustme (a test dependency; the service configured from a
service.yaml, the client and a real endpoint each on "another machine" with the CA in their own
service.json) and the openssl command (the service configured with flags)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tether import Client, Executor, TetherError
from tether.errors import ConfigError
from tether.home import write_secret
from tether.local import LocalStack

import helpers
from conftest import home_env, tether_cli

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None and not os.environ.get("CI"),
                                   reason="needs the openssl command to make a test CA (apt-get install openssl)")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def trustme_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """A service started from a service.yaml whose tls.cert/tls.key a throwaway trustme CA
    signed; the CA is not in the config (clients must bring it). Yields (url, token, CA file)."""
    d = tmp_path_factory.mktemp("trustme")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    (d / "tls").mkdir()
    (d / "tls" / "server.pem").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(d / "tls" / "server.key"))
    os.chmod(d / "tls" / "server.key", 0o600)
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    config = d / "service.yaml"
    config.write_text("home: service-home\nport: 0\ntls:\n  cert: tls/server.pem\n  key: tls/server.key\n")
    env = home_env(d / "operator")  # the config's home wins over TETHER_HOME
    tether_cli(env, "service", "start", "--config", str(config), "--detach")
    try:
        info = json.loads((d / "service-home" / "service.json").read_text())
        assert "ca_file" not in info
        yield info["url"], info["token"], d / "ca.pem"
    finally:
        tether_cli(env, "service", "stop", "--config", str(config), check=False)


def _machine(home: Path, url: str, token: str, ca_file: Path | None) -> dict[str, str]:
    """Another machine's TETHER_HOME: its service.json names the service, the token and (or
    not) the CA to verify the service's certificate with."""
    info: dict[str, str] = {"url": url, "token": token}
    if ca_file is not None:
        info["ca_file"] = str(ca_file)
    write_secret(home / "service.json", json.dumps(info))
    return home_env(home)


def test_a_client_and_an_endpoint_verify_the_service_with_the_ca_in_their_config(
        trustme_service: tuple[str, str, Path], tmp_path: Path, monkeypatch) -> None:
    url, token, ca_file = trustme_service
    assert url.startswith("https://127.0.0.1:")
    endpoint_env = _machine(tmp_path / "cluster", url, token, ca_file)
    tether_cli(endpoint_env, "endpoint", "configure", "hpc", "--engine", "thread", "--workers", "1")
    endpoint_id = tether_cli(endpoint_env, "endpoint", "start", "hpc", "--detach").stdout.strip().splitlines()[-1]
    try:
        credential = json.loads((tmp_path / "cluster" / "endpoints" / "hpc" / "credential.json").read_text())
        assert credential["ca_file"] == str(ca_file)  # the daemon verifies with the CA it registered with
        client_env = _machine(tmp_path / "laptop", url, token, ca_file)
        for key in [k for k in os.environ if k.startswith("TETHER_")]:
            monkeypatch.delenv(key)
        monkeypatch.setenv("TETHER_HOME", client_env["TETHER_HOME"])
        with Executor(endpoint_id=endpoint_id) as ex:  # url, token and CA from the laptop's service.json
            assert ex.submit(helpers.square, 9).result(timeout=60) == 81  # over wss:// both ways
        assert Client().whoami()["name"] == "local"
    finally:
        tether_cli(endpoint_env, "endpoint", "stop", "hpc", check=False)


def test_without_the_ca_client_and_endpoint_refuse_the_service_in_words(
        trustme_service: tuple[str, str, Path], tmp_path: Path, monkeypatch) -> None:
    url, token, _ = trustme_service
    endpoint_env = _machine(tmp_path / "cluster", url, token, None)
    tether_cli(endpoint_env, "endpoint", "configure", "hpc", "--engine", "thread", "--workers", "1")
    out = tether_cli(endpoint_env, "endpoint", "start", "hpc", "--detach", check=False)
    said = " ".join((out.stdout + out.stderr).split())
    assert out.returncode != 0 and "certificate" in said and "TETHER_CA_FILE" in said, said
    assert not (tmp_path / "cluster" / "endpoints" / "hpc" / "credential.json").exists()

    for key in [k for k in os.environ if k.startswith("TETHER_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("TETHER_HOME", _machine(tmp_path / "laptop", url, token, None)["TETHER_HOME"])
    with pytest.raises(TetherError, match="certificate.*TETHER_CA_FILE"):
        Client().whoami()


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


@needs_openssl
def test_tasks_travel_over_verified_tls(tls_stack: LocalStack, pki: Path, monkeypatch) -> None:
    assert tls_stack.service_url.startswith("https://127.0.0.1:")
    monkeypatch.setenv("TETHER_CA_FILE", str(pki / "ca.pem"))
    ex = Executor(endpoint_id=tls_stack.endpoint_id, service=tls_stack.service_url, token=tls_stack.token)
    assert ex.submit(helpers.square, 12).result(timeout=60) == 144  # client and endpoint both on wss://
    assert Client(tls_stack.service_url, tls_stack.token).whoami()["name"] == "local"
    # a blob both ways: uploaded by the client, read by the endpoint's worker straight from the
    # service (verified with the CA the endpoint was configured with), kept and fetched back
    big = os.urandom(300_000)
    with Executor(endpoint_id=tls_stack.endpoint_id, service=tls_stack.service_url, token=tls_stack.token,
                  blob_threshold=1024) as blobs:
        assert blobs.submit(helpers.identity, big).result(timeout=60) == big


@needs_openssl
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
