"""The service config file (service.yaml) as an operator uses it: mistakes named with the file,
the key and a close match; secrets kept private; flags over the file; every ``tether service``
command takes ``--config``."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tether import Client
from tether.errors import ConfigError

from conftest import home_env, tether_cli

ROOT = Path(__file__).resolve().parent.parent


def _said(out: subprocess.CompletedProcess) -> str:
    return " ".join((out.stdout + out.stderr).split())  # rich wraps long lines


def test_mistakes_name_the_file_the_key_and_a_close_match(tmp_path: Path) -> None:
    from tether.service.settings import service_config

    config = tmp_path / "service.yaml"
    config.write_text("prot: 8421\ndb_url: mysql://x/y\ntls: {cert: a.pem, kee: a.key}\nlog_format: jsn\n")
    with pytest.raises(ConfigError) as info:
        service_config(config)
    text = str(info.value)
    assert text.startswith("invalid service configuration")
    assert f"{config}: (top level): unknown key 'prot' (did you mean 'port'?)" in text
    assert f"{config}: db_url: 'mysql://x/y' does not match" in text
    assert f"{config}: tls: unknown key 'kee' (did you mean 'key'?)" in text
    assert f"{config}: log_format: 'jsn' is not one of text, json (did you mean 'json'?)" in text
    out = tether_cli(home_env(tmp_path / "home"), "service", "start", "--config", str(config), check=False)
    assert out.returncode != 0 and "unknown key 'prot' (did you mean 'port'?)" in _said(out)

    config.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a YAML mapping"):
        service_config(config)
    with pytest.raises(ConfigError, match="cannot read the file"):
        service_config(tmp_path / "missing.yaml")


def test_the_example_config_is_valid_and_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    from tether.service.settings import service_config

    cfg = service_config(ROOT / "examples" / "service.yaml")
    assert cfg.db_url.startswith("postgresql+psycopg://") and cfg.broker_url.startswith("amqps://")
    assert cfg.tls_cert == "/etc/tether/tls/server.pem" and cfg.auto_migrate is False
    config = tmp_path / "conf" / "service.yaml"
    config.parent.mkdir()
    config.write_text("home: state\ntls: {cert: tls/c.pem, key: tls/k.pem}\n")
    cfg = service_config(config, port=1234)
    assert cfg.home == str(tmp_path / "conf" / "state") and cfg.tls_key == str(tmp_path / "conf" / "tls" / "k.pem")
    assert cfg.port == 1234 and cfg.resolved_db_url() == f"sqlite:///{tmp_path / 'conf' / 'state'}/service/tether.db"


def test_secrets_stay_private(tmp_path: Path) -> None:
    from tether.service.settings import service_config

    config = tmp_path / "service.yaml"
    config.write_text("db_url: postgresql+psycopg://tether:s3cret@db/tether\nbroker_url: amqp://t:pw@mq/tether\n")
    os.chmod(config, 0o644)
    with pytest.raises(ConfigError, match=r"db_url, broker_url holds a password, but the file is readable by others "
                                          r"\(mode 0644\): chmod 600"):
        service_config(config)
    os.chmod(config, 0o600)
    assert service_config(config).broker_url == "amqp://t:pw@mq/tether"

    secret = tmp_path / "globus-secret"
    secret.write_text("the-secret\n")
    os.chmod(secret, 0o640)
    config.write_text("port: 0\nglobus: {client_id: abc, client_secret_file: globus-secret}\n")
    out = tether_cli(home_env(tmp_path / "home"), "service", "start", "--config", str(config), check=False)
    assert out.returncode != 0
    assert f"{secret} has mode 0640" in _said(out) and f"chmod 600 {secret}" in _said(out)


def test_flags_override_the_file_and_every_command_takes_config(tmp_path: Path) -> None:
    config = tmp_path / "service.yaml"
    # the file alone would be refused: beyond loopback without TLS
    config.write_text("home: svc\nhost: 0.0.0.0\nport: 0\nreplica_id: r1\n")
    env = home_env(tmp_path / "elsewhere")
    refused = tether_cli(env, "service", "start", "--config", str(config), check=False)
    assert refused.returncode != 0 and "refusing to listen on 0.0.0.0 without TLS" in _said(refused)

    tether_cli(env, "service", "start", "--config", str(config), "--host", "127.0.0.1", "--detach")
    try:
        assert "up (pid" in _said(tether_cli(env, "service", "status", "--config", str(config)))
        user = json.loads(tether_cli(env, "service", "user-add", "alice", "--config", str(config), "--json").stdout)
        url = json.loads((tmp_path / "svc" / "service.json").read_text())["url"]
        assert Client(url, user["token"]).whoami()["name"] == "alice"
        tether_cli(env, "service", "token-revoke", "alice", "--config", str(config))
        assert "up to date" in tether_cli(env, "service", "db", "current", "--config", str(config)).stdout
        assert "already at revision" in tether_cli(env, "service", "db", "upgrade", "--config", str(config)).stdout
    finally:
        assert "stopped the service" in tether_cli(env, "service", "stop", "--config", str(config)).stdout
    assert not (tmp_path / "elsewhere" / "service.json").exists()  # the config's home was used throughout

    from tether.service.cli import db_app, service_app

    commands = [c for c in service_app.registered_commands] + [c for c in db_app.registered_commands]
    for command in commands:
        help_text = tether_cli(env, "service", *([] if command in service_app.registered_commands else ["db"]),
                           command.name, "--help").stdout
        assert "--config" in help_text, command.name


def test_the_server_carries_broker_url_and_replica_id_to_the_app(tmp_path: Path) -> None:
    from tether.service.server import parser
    from tether.service.settings import service_config

    config = tmp_path / "service.yaml"
    config.write_text("port: 0\nbroker_url: amqp://mq.example.org/tether\nreplica_id: from-file\n")
    out = tether_cli(home_env(tmp_path / "home"), "service", "start", "--config", str(config), check=False)
    assert out.returncode != 0 and "replicas (broker_url) must share one database" in _said(out)
    args = vars(parser().parse_args(["--config", str(config), "--replica-id", "from-flag"]))
    cfg = service_config(args.pop("config"), **args)
    assert cfg.broker_url == "amqp://mq.example.org/tether" and cfg.replica_id == "from-flag"
    assert vars(parser().parse_args(["--broker-url", "amqp://h/v"]))["broker_url"] == "amqp://h/v"

    from tether.service.app import Settings, create_app

    app = create_app(Settings(db_url=f"sqlite:///{tmp_path / 'db.sqlite'}", broker_url=cfg.broker_url,
                              blob_dir=str(tmp_path / 'blobs'),
                              replica_id=cfg.replica_id))
    try:
        assert app.state.settings.broker_url == "amqp://mq.example.org/tether"
        assert app.state.settings.replica_id == "from-flag"
    finally:
        app.state.store.close()


def test_every_key_is_documented_in_the_deploy_guide() -> None:
    import re

    from tether.service.settings import SCHEMA

    keys = set()
    for key, spec in SCHEMA["properties"].items():
        sections = spec.get("properties") if spec.get("type") == "object" else None
        if sections:
            keys.update(f"{key}.{sub}" for sub in sections)
        else:
            keys.add(key)
    guide = (ROOT / "docs" / "deploy.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_.]+)` \|", guide, re.M))
    assert keys == documented, f"undocumented: {keys - documented}; documented but unknown: {documented - keys}"
