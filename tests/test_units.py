"""Pure functions: the wire codec, serialization headers, config validation, error mapping."""

from __future__ import annotations

import msgpack
import pytest

from tether import TaskFailed
from tether.digest import digest_of
from tether.errors import SerializationError, VersionMismatch, task_failed
from tether.protocol import (
    CLIENT_FRAMES,
    ENDPOINT_FRAMES,
    PROTOCOL_VERSION,
    FrameDecoder,
    ProtocolError,
    Submit,
    Task,
    encode,
)
from tether.serialize import PY_VERSION, deserialize, serialize

FID = "0123456789abcdef0123456789abcdef"


def test_frames_round_trip_with_version() -> None:
    frame = encode(Submit(ref=3, tasks=[Task(id="a", function=FID, endpoint="e", payload=b"\x00\x01")]))
    assert msgpack.unpackb(frame)["v"] == PROTOCOL_VERSION
    msg = FrameDecoder(CLIENT_FRAMES, "a client").decode(frame)
    assert isinstance(msg, Submit) and msg.ref == 3 and msg.tasks[0].payload == b"\x00\x01"


def test_text_frames_are_refused() -> None:
    with pytest.raises(ProtocolError, match="text frame"):
        FrameDecoder(CLIENT_FRAMES, "a client").decode("hello")


@pytest.mark.parametrize(("frame", "words"), [
    ({"t": "subscribe", "v": PROTOCOL_VERSION, "ids": [1]}, r"Expected `str`, got `int` - at `\$.ids\[0\]`"),
    ({"t": "subscribe", "v": PROTOCOL_VERSION, "ids": ["../../../tmp/x"]}, r"matching regex .* at `\$.ids\[0\]`"),
    ({"t": "subscribe", "v": PROTOCOL_VERSION, "ids": ["a"] * 10_001}, r"length <= 10000"),
    ({"t": "hello", "v": PROTOCOL_VERSION}, r"'hello' is not a message a client may send"),
    ({"t": "submit", "v": 1}, r"protocol version 1 is not supported"),
    ({"t": "submit", "v": PROTOCOL_VERSION, "ref": 1, "tasks": [
        {"id": "a", "function": FID, "endpoint": "e", "payload": b"", "spec": {"num_ranks": b"\x00"}}]},
     r"a resource specification must be plain JSON data"),
    ({"t": "submit", "v": PROTOCOL_VERSION, "ref": 1, "tasks": [
        {"id": "a", "function": FID, "endpoint": "e", "payload": b"", "uec": {"k": [b"x"]}}]},
     r"a user endpoint config must be plain JSON data"),
])
def test_client_frames_are_checked_at_the_edge(frame: dict, words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        FrameDecoder(CLIENT_FRAMES, "a client").decode(msgpack.packb(frame))


@pytest.mark.parametrize(("frame", "words"), [
    ({"t": "heartbeat", "capacity": "x"}, r"Expected `object`, got `str` - at `\$.capacity`"),
    ({"t": "heartbeat", "capacity": {"workers_idle": -1}}, r"'workers_idle' must be a count"),
    ({"t": "heartbeat", "capacity": {"workers_total": 10**15}}, r"'workers_total' must be a count from 0"),
    ({"t": "heartbeat", "capacity": {"workers_total": 2**64 - 1}}, r"'workers_total' must be a count from 0"),
    ({"t": "hello", "capacity": {"blocks": 2**63}}, r"'blocks' is implausibly large"),
    ({"t": "hello", "versions": "x"}, r"at `\$.versions`"),
    ({"t": "result", "results": [{"id": "a", "state": "running"}]}, r"Invalid enum value 'running'"),
])
def test_endpoint_frames_are_checked_at_the_edge(frame: dict, words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        FrameDecoder(ENDPOINT_FRAMES, "an endpoint").decode(msgpack.packb({"v": PROTOCOL_VERSION, **frame}))


def test_json_data_serializer_runs_no_code() -> None:
    data = serialize(((1, "a"), {"k": [True, None]}), "json")
    assert data.startswith(b"tether:1;method=json;")
    assert deserialize(data, allowed_methods=frozenset({"json"})) == [[1, "a"], {"k": [True, None]}]
    with pytest.raises(SerializationError, match="plain data"):
        serialize(((object(),), {}), "json")


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


@pytest.mark.parametrize("threshold", [1 << 30, 4096])
def test_a_spill_holds_what_pickle_writes_in_memory_or_on_disk(tmp_path, threshold: int) -> None:
    """Pickle writes bytes, memoryviews and (protocol 5) PickleBuffers; a small value stays in
    memory and touches no directory, a large one lands in a file; a small one hashes to what it
    holds, a large one is not hashed at all (its upload hashes it as it sends it)."""

    import numpy as np

    from tether.serialize import serialize_into
    from tether.spill import Spill

    value = {"array": np.arange(100_000), "text": "x" * 100}
    asked: list[int] = []

    def directory() -> object:
        asked.append(1)
        return tmp_path / "spill"

    spill = Spill(threshold, directory, "t.args")
    serialize_into(value, spill)
    spill.close()
    data = spill.path.read_bytes() if spill.spilled else spill.getvalue()
    assert spill.spilled == (threshold == 4096) and bool(asked) == spill.spilled
    assert spill.size == len(data)
    assert spill.digest == ("" if spill.spilled else digest_of(data))
    loaded = deserialize(data)
    assert (loaded["array"] == value["array"]).all() and loaded["text"] == value["text"]


def test_a_client_spill_keeps_large_bytes_by_reference_and_streams_them_in_order(tmp_path) -> None:
    """The client's spill of a large ``bytes`` argument: the bytes are not written to its file (the
    caller holds them, and they cannot change), yet the pieces an upload sends are the whole
    pickle, in order (an upload hashes them as it sends them); a mutable buffer still goes to
    the file, since it could change before the upload."""
    from tether.serialize import serialize_into
    from tether.spill import BY_REFERENCE_MIN, Spill

    big = bytes(range(256)) * (3 * BY_REFERENCE_MIN // 256)
    value = ({"big": big, "mutable": bytearray(2 * BY_REFERENCE_MIN), "again": big, "small": b"x" * 10}, {})
    spill = Spill(4096, tmp_path, "t.args", by_reference=True)
    serialize_into(value, spill)
    spill.close()
    sent = b"".join(bytes(piece) for piece in spill.pieces())
    assert len(sent) == spill.size and spill.digest == ""  # hashed by the upload, not before
    assert spill.path.stat().st_size == spill.size - len(big)  # all but the bytes object (pickled once)
    assert deserialize(sent) == value
    spill.discard()
    assert not spill.path.exists()


def test_the_user_config_template_configure_writes_renders_unedited(tmp_path) -> None:
    """`tether endpoint configure NAME --multi-user` writes a template (comments included) that
    renders for a user as written: a newcomer's first task must not fail on it."""
    import subprocess
    import sys

    import yaml

    from tether.endpoint.identity import LocalAccount
    from tether.endpoint.user_config import user_endpoint_config

    env = {"TETHER_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-m", "tether.cli", "endpoint", "configure", "cluster", "--multi-user"], env=env,
                   check=True, capture_output=True, timeout=60)
    directory = tmp_path / "endpoints" / "cluster"
    account = LocalAccount("someone", 1234, 1234, "/home/someone", "/bin/bash")
    for values, workers in (({}, 2), ({"workers": 3}, 3)):
        text, config = user_endpoint_config(directory, "user_config_template.yaml.j2", "user_config_schema.json",
                                            values, account, {"id": "i", "username": "someone"}, "cluster",
                                            "cluster-someone")
        assert yaml.safe_load(text)["engine"]["workers"] == workers


def test_a_long_failure_message_is_cut_to_fit_never_refused() -> None:
    """A user endpoint that dies with long log lines: the report reaches the service (its tasks
    fail in words) with the message's start and its last line kept."""
    from tether.protocol import SHORT_STR_MAX, UserEndpointFailed

    long = "the user endpoint exited with code 1: " + "x" * 20_000 + " | MemoryError: the last line"
    frame = encode(UserEndpointFailed(user_endpoint_id="ue-1", message=long))
    msg = FrameDecoder(ENDPOINT_FRAMES, "an endpoint").decode(frame)
    assert len(msg.message) <= SHORT_STR_MAX
    assert msg.message.startswith("the user endpoint exited with code 1") and msg.message.endswith("the last line")


def test_one_version_comparison_for_the_client_and_the_plugins() -> None:
    from tether.versions import Difference, Needed, differences, installed

    needed = (Needed("python", required=False), Needed("tool", parts=2), Needed("extra", required=False))
    here = {"python": "3.11", "tool": "8.1.2", "extra": "1.0"}
    assert differences(needed, dict(here), here) == []
    assert differences(needed, {"tool": "8.1.2"}, here) == []  # optional ones may be absent there
    assert differences(needed, {"python": "3.12", "tool": "8.1.3"}, here) == [
        Difference("python", "3.11", "3.12", True), Difference("tool", "8.1.2", "8.1.3", False)]
    assert differences(needed, {"tool": "8.2.0", "extra": "2.0"}, here) == [
        Difference("tool", "8.1.2", "8.2.0", True), Difference("extra", "1.0", "2.0", True)]
    assert differences(needed, {"python": "3.11"}, here) == [Difference("tool", "8.1.2", None, True)]
    assert set(installed(["python", "msgspec", "surely-not-installed-here"])) == {"python", "msgspec"}


def test_a_spool_written_by_the_previous_version_is_sent_after_an_upgrade(tmp_path) -> None:
    """Results spooled as plain msgpack maps (before results were typed records) load as
    ``Result``s, next to records written now, and leave the spool when acknowledged."""
    from tether.endpoint.spool import ResultSpool
    from tether.protocol import ErrorInfo, Result

    old = [
        {"id": "t-old-ok", "state": "success", "data": b"\x80\x04K\x01.", "error": None,
         "times": {"running": 1.0, "success": 2.0, "dispatched": 0.5}},
        {"id": "t-old-cancel", "state": "cancelled", "data": None, "times": {"cancelled": 3.0},
         "error": {"type": "TaskCancelled", "message": "cancelled by its owner", "traceback": ""}},
        {"id": "t-old-big", "state": "failed", "data": None, "times": {"failed": 4.0},
         "error": {"type": "PayloadTooLarge", "message": "too big", "traceback": "", "code": "PAYLOAD_TOO_LARGE"}},
    ]
    (tmp_path / f"{1:020d}-1-0.spool").write_bytes(b"".join(msgpack.packb(r, use_bin_type=True) for r in old))

    spool = ResultSpool(tmp_path)
    spool.write([Result(id="t-new", state="success", data=b"new", times={"success": 5.0})])
    pending = {r.id: r for r in spool.pending()}
    assert sorted(pending) == ["t-new", "t-old-big", "t-old-cancel", "t-old-ok"]
    assert all(isinstance(r, Result) for r in pending.values())
    assert pending["t-old-ok"] == Result(id="t-old-ok", state="success", data=b"\x80\x04K\x01.",
                                         times={"running": 1.0, "success": 2.0, "dispatched": 0.5})
    assert pending["t-old-cancel"].error == ErrorInfo(type="TaskCancelled", message="cancelled by its owner")
    assert pending["t-old-big"].error.code == "PAYLOAD_TOO_LARGE"

    reopened = ResultSpool(tmp_path)  # a restart reads both formats back
    assert sorted(reopened.ids()) == sorted(pending)
    reopened.ack(["t-old-ok", "t-old-cancel", "t-old-big"])
    assert [r.id for r in reopened.pending()] == ["t-new"]


def test_replica_events_travel_as_tagged_records_and_another_version_is_refused() -> None:
    from tether.service.replica_events import BUS_VERSION, Close, EventError, StatusChanged, decode_event, encode_event

    event = decode_event(encode_event(StatusChanged(user_id="u", updates=[("t1", "running", 1.5)])))
    assert isinstance(event, StatusChanged) and event.updates == [("t1", "running", 1.5)] and event.key == "user.u"
    # the untagged events of earlier versions, and events of another bus version, are never misread
    with pytest.raises(EventError, match="not an event of bus version"):
        decode_event(msgpack.packb({"o": "r1", "k": "refill", "t": "ep-1", "d": ["t1"]}))
    with pytest.raises(EventError, match=f"bus version {BUS_VERSION + 1}, not {BUS_VERSION}"):
        decode_event(encode_event(Close(endpoint_id="e", code=4000, reason="r", v=BUS_VERSION + 1)))


def test_small_tasks_and_results_cross_replicas_whole_and_large_ones_by_id() -> None:
    """What another replica receives: a small task or result whole (no read of the database),
    a large one only named; tasks for one replica's endpoints go to that replica's key."""
    import uuid

    from tether.protocol import Result, Task
    from tether.service.replica_events import (
        INLINE_BYTES,
        OfferedTo,
        OwnedTask,
        ResultsPushed,
        decode_event,
        encode_event,
        inline,
    )

    task = Task(id=str(uuid.uuid4()), function="f" * 32, endpoint=str(uuid.uuid4()), payload=b"args")
    event = decode_event(encode_event(OfferedTo(replica="r2", tasks=[OwnedTask("alice", task)])))
    assert isinstance(event, OfferedTo) and event.key == "replica.r2" and event.tasks[0].task == task
    result = Result(id=task.id, state="success", data=b"42", times={"success": 2.0})
    pushed = decode_event(encode_event(ResultsPushed(user_id="alice", results=[result])))
    assert isinstance(pushed, ResultsPushed) and pushed.results == [result] and pushed.key == "user.alice"
    assert inline(task) and inline(result)
    assert not inline(Task(id=task.id, function=task.function, endpoint=task.endpoint, payload=b"x" * INLINE_BYTES))


def test_a_replica_remembers_tasks_that_ended_so_a_late_copy_is_not_sent_again() -> None:
    from tether.protocol import Result
    from tether.service.routing import Routes

    routes = Routes(remember_ended=True)
    routes.track("ep", ["t1", "t2"])
    fresh = routes.claim(["t1"], [Result(id="t1", state="success")])
    routes.forget(["t2"])  # cancelled
    assert [r.id for r in fresh] == ["t1"] and routes.ended("t1") and routes.ended("t2")
    one_process = Routes()  # no copies travel to a lone service: nothing to remember
    one_process.track("ep", ["t1"])
    one_process.claim(["t1"], [Result(id="t1", state="success")])
    assert not one_process.ended("t1")


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_linger_poked_just_after_arming_a_sub_millisecond_send_neither_raises_nor_loses_it(loop_kind: str) -> None:
    """uvloop makes a timer due in under a millisecond a plain Handle, without ``when()``: a
    poke that then asked the handle raised in its caller (an endpoint's engine callback, which
    then left queued tasks unassigned, or its cancel handling, which dropped the link)."""
    import asyncio

    from tether.linger import Linger

    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    sends: list[float] = []

    async def burst() -> None:
        linger = Linger(lambda: sends.append(loop.time()), window=0.05)
        linger.sent()  # a send just happened: the window is open
        linger.poke(busy=True, window=0.0002)  # armed, due in 0.2 ms
        linger.poke(busy=False)  # the burst is over: it goes now, once
        assert len(sends) == 1
        await asyncio.sleep(0.02)  # the armed send was withdrawn: nothing goes twice
        linger.poke(busy=True, window=0.0002)
        await asyncio.sleep(0.02)  # and a send armed that way fires
        assert len(sends) == 2

    try:
        loop.run_until_complete(burst())
    finally:
        loop.close()


def test_where_a_submitters_file_goes_in_a_tasks_directory() -> None:
    """tether.files: relative paths keep their names; absolute ones (or ones climbing out) are
    kept apart by a digest of where they came from; nothing lands outside the directory."""
    from tether.files import ELSEWHERE, inside, task_relative_name

    assert task_relative_name("data/in.csv") == "data/in.csv"
    assert task_relative_name("./data//in.csv") == "data/in.csv"
    a, b = task_relative_name("/home/me/a/x.txt"), task_relative_name("/home/me/b/x.txt")
    assert a != b and a.startswith(ELSEWHERE + "/") and a.endswith("/x.txt")
    assert task_relative_name("../up.txt").startswith(ELSEWHERE + "/")
    assert inside("/t/1", "data/in.csv") == "/t/1/data/in.csv"
    for bad in ("../2/x", "/etc/passwd", "a/../../x"):
        with pytest.raises(ValueError, match="not a path inside"):
            inside("/t/1", bad)


def test_futures_in_arguments_become_placeholders_and_back() -> None:
    """tether.refs: what the client swaps out is what the worker fills in, containers and all;
    arguments with nothing to swap are returned as the same objects."""
    from tether.refs import SEARCH_ITEMS, TaskInput, fill_inputs, swap_inputs

    class Ref:  # stands for a future
        def __init__(self, tid: str) -> None:
            self.tid = tid

    def resolve(obj: object) -> object:
        return TaskInput(obj.tid) if isinstance(obj, Ref) else obj

    a, b = Ref("t-a"), Ref("t-b")
    plain = (1, "x", None, [1, 2], {"k": (3,)})
    args, kwargs, swapped = swap_inputs(plain, {}, resolve)
    assert swapped is None and args is plain
    args, kwargs, swapped = swap_inputs((a, [1, {"deep": (b,)}], {a}), {"k": [b]}, resolve)
    assert swapped is not None and swapped.ids == ["t-a", "t-b", "t-a", "t-b"] and swapped.holders[0] is a
    assert fill_inputs(args, kwargs, {"t-a": "A", "t-b": "B"}) == (("A", [1, {"deep": ("B",)}], {"A"}), {"k": ["B"]})
    huge = [a] * (SEARCH_ITEMS + 1)  # not searched: passed as it is
    assert swap_inputs((huge,), {}, resolve)[2] is None
