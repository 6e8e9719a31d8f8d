"""Pure functions: the wire codec, serialization headers, config validation, error mapping."""

from __future__ import annotations

import pytest

from tether import TaskFailed
from tether.errors import SerializationError, VersionMismatch, task_failed
from tether.protocol import PROTOCOL_VERSION, Msg, ProtocolError, decode, encode
from tether.serialize import PY_VERSION, deserialize, serialize


def test_frames_round_trip_with_version() -> None:
    frame = encode(Msg.SUBMIT, ref=3, tasks=[{"id": "a", "payload": b"\x00\x01"}])
    msg = decode(frame)
    assert msg["v"] == PROTOCOL_VERSION and msg["t"] == "submit" and msg["tasks"][0]["payload"] == b"\x00\x01"


def test_text_frames_are_refused() -> None:
    with pytest.raises(ProtocolError, match="text frame"):
        decode("hello")


def test_serialization_round_trip_and_header() -> None:
    data = serialize(lambda x: x + 1)
    assert data.startswith(f"tether:1;method=cloudpickle;py={PY_VERSION}\n".encode())
    assert deserialize(data)(1) == 2


def test_python_version_mismatch_names_both_versions() -> None:
    data = serialize(42).replace(f"py={PY_VERSION}".encode(), b"py=3.9", 1)
    with pytest.raises(VersionMismatch) as info:
        deserialize(data)
    assert "Python 3.9" in str(info.value) and f"Python {PY_VERSION}" in str(info.value)


def test_disallowed_method_is_refused() -> None:
    with pytest.raises(SerializationError, match="not allowed here"):
        deserialize(serialize(1), allowed_methods=frozenset({"json"}))
    with pytest.raises(SerializationError, match="no Tether header"):
        deserialize(b"\x80\x04K\x01.")


def test_task_failed_is_also_the_remote_type() -> None:
    exc = task_failed({"type": "ValueError", "message": "bad", "traceback": "tb"}, None, "t1")
    assert isinstance(exc, ValueError) and isinstance(exc, TaskFailed)
    assert "bad" in str(exc) and "tb" in str(exc)
    plain = task_failed({"type": "some.module.Unknown", "message": "m"}, None, "t2")
    assert type(plain) is TaskFailed and plain.remote_type == "some.module.Unknown"


def test_config_validation_messages(tmp_path, monkeypatch) -> None:
    from tether.endpoint.config import load_config
    from tether.errors import ConfigError

    monkeypatch.setenv("TETHER_HOME", str(tmp_path))
    d = tmp_path / "endpoints" / "e"
    d.mkdir(parents=True)
    (d / "config.yaml").write_text("engine: {type: thread, workers: 0}\n")
    with pytest.raises(ConfigError, match=r"engine\.workers: 0 is less than the minimum of 1"):
        load_config("e")
    (d / "config.yaml").write_text("engine: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("e")
    with pytest.raises(ConfigError, match="tether endpoint configure nope"):
        load_config("nope")
