"""Large payloads (issue 11): arguments, results and function bodies far beyond a frame travel
as blobs, streamed through the service's disk, checked by their BLAKE3 digest, within per-service and
per-endpoint limits, readable only by who may, and deleted with their tasks."""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil
import pytest

from tether import Client, Executor
from tether.digest import digest_of
from tether.errors import BlobCorrupt, PayloadTooLarge, QuotaExceeded
from tether.local import LocalStack, local_stack
from tether.protocol import Collected, ErrorCode, Submit, SubmitAck, Task, blob_stub
from tether.serialize import function_id, serialize
from tether.transfer import BlobClient, _raise_for

import helpers
from conftest import wait_for
from rogue import raw_client

MiB = 1024 * 1024
GiB = 1024 * MiB


class PeakRSS:
    """Samples a process's resident memory in a thread while a block runs."""

    def __init__(self, pid: int, every: float = 0.02):
        self.process = psutil.Process(pid)
        self.start = self.peak = self.process.memory_info().rss
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self._every):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.start


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A stack for gigabyte payloads: results and blobs expire a second after collection."""
    with local_stack(tmp_path_factory.mktemp("big"), engine="process", workers=1,
                     service_args=("--result-retention", "1", "--purge-interval", "0.5")) as s:
        yield s


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A stack with small limits: 32 MiB per blob, 100 MiB of blobs per user, 1 MiB threshold."""
    with local_stack(tmp_path_factory.mktemp("small"), engine="process", workers=2,
                     service_args=("--max-blob-bytes", str(32 * MiB), "--blob-quota-bytes", str(100 * MiB),
                                   "--blob-threshold-bytes", str(MiB), "--result-retention", "1",
                                   "--purge-interval", "0.5")) as s:
        yield s


def _executor(stack: LocalStack, **kwargs: object) -> Executor:
    return Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token, **kwargs)


def _blob_files(stack: LocalStack) -> list[Path]:
    return sorted((stack.home / "service" / "blobs").iterdir())


def _user(stack: LocalStack, name: str) -> str:
    out = subprocess.run([sys.executable, "-m", "tether.cli", "service", "user-add", name, "--json"], env=stack.env,
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)["token"]


@pytest.mark.timeout(600)
def test_a_gibibyte_argument_and_result_cross_intact_while_the_service_stays_small(big: LocalStack) -> None:
    with _executor(big, progress=False) as ex:
        assert ex.submit(helpers.square, 3).result(timeout=60) == 9
        data = os.urandom(GiB)
        expected = hashlib.sha256(data).hexdigest()
        with PeakRSS(big.service_pid()) as service:
            assert ex.submit(helpers.sha256_hex, data).result(timeout=300) == expected
            del data
            result = ex.submit(helpers.blob, GiB).result(timeout=300)
        assert len(result) == GiB and hashlib.sha256(result).hexdigest() == hashlib.sha256(b"x" * GiB).hexdigest()
        del result
    assert service.growth < 200 * MiB, f"the service grew by {service.growth / MiB:.0f} MiB"
    # collected: a second later the blobs go with their tasks
    wait_for(lambda: not _blob_files(big), timeout=30, what="the blobs to be deleted after retention")
    assert not list((big.endpoint_dir() / "blobs").iterdir()), "the endpoint keeps no blob files"


@pytest.mark.timeout(300)
def test_a_closure_over_100_mb_is_uploaded_once_and_runs(big: LocalStack, caplog: pytest.LogCaptureFixture) -> None:
    fn = helpers.closure_over(b"c" * (100 * 1000 * 1000))
    with caplog.at_level(logging.INFO, logger="tether.transfer"), _executor(big) as ex:
        futures = [ex.submit(fn, b"x" * i) for i in range(3)]
        assert [f.result(timeout=120) for f in futures] == [100_000_000 + i for i in range(3)]
        function_blobs = [p for p in _blob_files(big) if p.stat().st_size > 100_000_000]
        assert len(function_blobs) == 1, "the body went once, for all three tasks"
        # its tasks collected, the body's blob expires with them; the function still works, sent anew
        wait_for(lambda: not function_blobs[0].exists(), timeout=30, what="the function's blob to expire")
        assert ex.submit(fn, b"y").result(timeout=120) == 100_000_001
    # stderr is no terminal here: a long transfer shows its progress as log lines
    uploads = [r.getMessage() for r in caplog.records if r.getMessage().startswith("upload function")]
    assert len(uploads) >= 2 and "95.4 MiB to transfer" in uploads[0] and "MiB/s" in uploads[-1]


def test_an_item_over_the_blob_limit_fails_alone_in_words(small: LocalStack) -> None:
    with _executor(small) as ex:
        before = ex.submit(helpers.identity, b"a" * (5 * MiB))
        too_big = ex.submit(helpers.identity, b"b" * (40 * MiB))
        inline = ex.submit(helpers.square, 12)
        with pytest.raises(PayloadTooLarge, match=r"over this service's limit of 33554432 bytes per blob"):
            too_big.result(timeout=60)
        assert before.result(timeout=60) == b"a" * (5 * MiB)
        assert inline.result(timeout=60) == 144
        # a result over the limit fails in words too, on the endpoint's side of the service
        with pytest.raises(PayloadTooLarge, match="over this service's limit"):
            ex.submit(helpers.blob, 40 * MiB).result(timeout=60)


def test_the_quota_is_checked_on_the_declared_size_before_any_byte_moves(small: LocalStack) -> None:
    blobs = BlobClient(small.service_url, {"Authorization": f"Bearer {small.token}"})
    http = httpx.Client(base_url=small.service_url, headers={"Authorization": f"Bearer {small.token}"},
                        trust_env=False)
    reserved = []
    wait_for(lambda: not _blob_files(small), timeout=30, what="earlier tests' blobs to expire (they count)")
    try:
        for _ in range(3):  # 90 of the 100 MiB, declared: no byte sent
            answer = http.post("/v1/blobs", json={"size": 30 * MiB, "digest": "0" * 64})
            assert answer.status_code == 201, answer.text
            reserved.append(answer.json()["blob_id"])
        refused = http.post("/v1/blobs", json={"size": 30 * MiB, "digest": "0" * 64})
        assert refused.status_code == 429
        assert "would take you over your quota of 104857600 stored bytes" in refused.json()["detail"]
        with _executor(small) as ex, pytest.raises(QuotaExceeded, match="quota"):
            ex.submit(helpers.identity, b"q" * (20 * MiB)).result(timeout=60)
    finally:
        for blob_id in reserved:  # an upload given up on is deleted (and its bytes leave the quota)
            assert http.delete(f"/v1/blobs/{blob_id}").status_code == 204
    ref = blobs.upload(b"z" * (30 * MiB), 30 * MiB, digest_of(b"z" * (30 * MiB)))
    assert http.get(f"/v1/blobs/{ref.id}").status_code == 200
    http.delete(f"/v1/blobs/{ref.id}")


def test_the_bytes_of_an_upload_that_breaks_off_or_lies_about_its_hash_are_deleted(small: LocalStack) -> None:
    http = httpx.Client(base_url=small.service_url, headers={"Authorization": f"Bearer {small.token}"},
                        trust_env=False)
    data = b"d" * (2 * MiB)
    declared = http.post("/v1/blobs", json={"size": len(data), "digest": digest_of(data)}).json()
    short = http.put(f"/v1/blobs/{declared['blob_id']}", content=iter([data[: MiB]]))  # chunked, ends early
    assert short.status_code == 409 and "ended after 1048576 of the 2097152 bytes" in short.json()["detail"]
    assert http.get(f"/v1/blobs/{declared['blob_id']}").status_code == 409  # declared, no bytes
    lying = http.post("/v1/blobs", json={"size": len(data), "digest": "f" * 64}).json()
    answer = http.put(f"/v1/blobs/{lying['blob_id']}", content=data)
    assert answer.status_code == 409 and "not to the" in answer.json()["detail"]
    assert short.headers["Tether-Error"] == answer.headers["Tether-Error"] == "blob_corrupt"
    with pytest.raises(BlobCorrupt, match="not to the"):  # what the client raises for it
        _raise_for(answer, "upload")
    assert not [p for p in _blob_files(small) if p.name.startswith((declared["blob_id"], lying["blob_id"]))]
    assert http.put(f"/v1/blobs/{declared['blob_id']}", content=data).status_code == 200  # may be sent again
    for blob_id in (declared["blob_id"], lying["blob_id"]):  # given up on: the owner deletes them
        assert http.delete(f"/v1/blobs/{blob_id}").status_code == 204


def test_an_uploader_that_declares_a_sha256_is_told_to_declare_the_digest(small: LocalStack) -> None:
    """Protocol 2 named blobs by sha256; such a declaration is refused in words that say what to
    send, rather than ignored (which would fail its upload later, for a missing digest)."""
    http = httpx.Client(base_url=small.service_url, headers={"Authorization": f"Bearer {small.token}"},
                        trust_env=False)
    data = b"s" * MiB
    old = http.post("/v1/blobs", json={"size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    assert old.status_code == 422 and "declare `digest`" in old.text and "BLAKE3" in old.text, old.text
    assert http.post("/v1/blobs", json={"size": len(data), "digest": digest_of(data)}).status_code == 201


def test_a_digest_declared_at_the_end_of_the_upload_is_checked_there(small: LocalStack) -> None:
    """A blob declared without its digest (the uploader hashes while it sends) carries it after its
    bytes: the service stores the bytes that match it and names it afterwards; a digest that
    does not match, or a body that ends before it, is refused in words and the bytes deleted, and
    a reader following such an upload never gets its last byte."""
    api = httpx.Client(base_url=small.service_url, headers={"Authorization": f"Bearer {small.token}"},
                        trust_env=False, timeout=60)
    data = os.urandom(3 * MiB)
    good = api.post("/v1/blobs", json={"size": len(data)}).json()
    assert good["digest"] == "" and good["state"] == "reserved"
    stored = api.put(f"/v1/blobs/{good['blob_id']}", content=data + digest_of(data).encode())
    assert stored.status_code == 200 and stored.json()["digest"] == digest_of(data), stored.text
    back = api.get(f"/v1/blobs/{good['blob_id']}")
    assert back.content == data and back.headers["X-Tether-Digest"] == digest_of(data)

    lying = api.post("/v1/blobs", json={"size": len(data)}).json()["blob_id"]
    got_first, out = threading.Event(), []
    reader = threading.Thread(target=_follow, args=(small.service_url, small.token, lying, MiB, got_first, out))

    def follows_then_lies() -> Iterator[bytes]:
        yield data[: 2 * MiB]
        reader.start()
        assert got_first.wait(30), "the reader did not get bytes of an upload under way"
        yield data[2 * MiB :] + digest_of(b"other").encode()

    refused = api.put(f"/v1/blobs/{lying}", content=follows_then_lies(),
                       headers={"Content-Length": str(len(data) + 64)})
    assert refused.status_code == 409 and "not to the" in refused.json()["detail"]
    assert refused.headers["Tether-Error"] == "blob_corrupt"
    reader.join(60)
    assert isinstance(out[0], http.client.IncompleteRead) and len(out[0].partial) + MiB < len(data), out

    short = api.post("/v1/blobs", json={"size": len(data)}).json()["blob_id"]
    cut = api.put(f"/v1/blobs/{short}", content=iter([data, digest_of(data).encode()[:10]]))  # chunked, ends early
    assert cut.status_code == 409 and "before their digest" in cut.json()["detail"]
    assert not [p for p in _blob_files(small) if p.name.startswith((lying, short))]
    for blob_id in (good["blob_id"], lying, short):
        api.delete(f"/v1/blobs/{blob_id}")
    api.close()


def test_a_large_upload_on_the_connection_itself_is_stored_whole_or_not_at_all(small: LocalStack) -> None:
    """A body of a mebibyte or more with a Content-Length is received on its connection's socket
    (service/raw_connection.py RawConnection) and written past the page cache in aligned batches:
    a size no batch divides comes back byte for byte, with and without its digest at the end; a
    body cut off mid-way leaves no bytes, gets no answer, and may be sent again."""
    api = httpx.Client(base_url=small.service_url, headers={"Authorization": f"Bearer {small.token}"},
                        trust_env=False, timeout=60)
    data = os.urandom(3 * MiB + 4097)  # three aligned batches, a page, and one byte
    ahead = api.post("/v1/blobs", json={"size": len(data), "digest": digest_of(data)}).json()["blob_id"]
    assert api.put(f"/v1/blobs/{ahead}", content=data).json()["state"] == "complete"
    at_end = api.post("/v1/blobs", json={"size": len(data)}).json()["blob_id"]
    stored = api.put(f"/v1/blobs/{at_end}", content=data + digest_of(data).encode()).json()
    assert stored["digest"] == digest_of(data)
    for blob_id in (ahead, at_end):
        assert api.get(f"/v1/blobs/{blob_id}").content == data
        assert (small.home / "service" / "blobs" / blob_id).stat().st_size == len(data)

    cut = api.post("/v1/blobs", json={"size": len(data), "digest": digest_of(data)}).json()["blob_id"]
    parts = urlsplit(small.service_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.putrequest("PUT", f"/v1/blobs/{cut}")
    for name, value in (("Authorization", f"Bearer {small.token}"), ("Content-Length", str(len(data)))):
        conn.putheader(name, value)
    conn.endheaders()
    conn.send(data[: 2 * MiB])
    conn.sock.shutdown(socket.SHUT_WR)  # the rest never comes
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        conn.getresponse()
    conn.close()
    wait_for(lambda: not [p for p in _blob_files(small) if p.name.startswith(cut)], timeout=30)
    wait_for(lambda: api.put(f"/v1/blobs/{cut}", content=data).status_code == 200, timeout=30)  # sent again
    assert api.get(f"/v1/blobs/{cut}").content == data

    # a reader that stops reading while the upload goes on past the pieces kept in memory (8 MiB)
    # gets the rest from the file
    large = os.urandom(24 * MiB)
    behind = api.post("/v1/blobs", json={"size": len(large), "digest": digest_of(large)}).json()["blob_id"]
    got_first, go, out = threading.Event(), threading.Event(), []

    def slow_reader() -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        conn.request("GET", f"/v1/blobs/{behind}", headers={"Authorization": f"Bearer {small.token}"})
        response = conn.getresponse()
        head = response.read(MiB)
        got_first.set()
        go.wait(60)
        out.append(head + response.read())
        conn.close()

    reader = threading.Thread(target=slow_reader)

    def uploads_past_the_reader() -> Iterator[bytes]:
        yield large[: 2 * MiB]
        reader.start()
        assert got_first.wait(30), "the reader did not get bytes of an upload under way"
        yield large[2 * MiB :]

    assert api.put(f"/v1/blobs/{behind}", content=uploads_past_the_reader(),
                   headers={"Content-Length": str(len(large))}).status_code == 200
    go.set()
    reader.join(60)
    assert out and out[0] == large
    for blob_id in (ahead, at_end, cut, behind):
        api.delete(f"/v1/blobs/{blob_id}")
    api.close()


def test_a_client_declares_the_digest_of_large_arguments_at_the_end_of_their_upload(small: LocalStack) -> None:
    """A large argument is not hashed before its upload starts (a gibibyte took about a second of
    that, before any byte moved): it is declared without its digest, hashed as it is sent, and
    the service names the digest once the bytes matched it; the worker gets the bytes sent."""
    data = os.urandom(12 * MiB)
    blobs = BlobClient(small.service_url, {"Authorization": f"Bearer {small.token}"})
    ref = blobs.upload(data, len(data), None)
    assert ref.digest == ""
    api = httpx.Client(base_url=small.service_url, headers={"Authorization": f"Bearer {small.token}"},
                       trust_env=False)
    assert api.get(f"/v1/blobs/{ref.id}").headers["X-Tether-Digest"] == digest_of(data)
    api.delete(f"/v1/blobs/{ref.id}")
    api.close()
    with _executor(small) as ex:
        assert ex.submit(helpers.sha256_hex, data).result(timeout=120) == hashlib.sha256(data).hexdigest()


def _follow(url: str, token: str, blob_id: str, first: int, got_first: threading.Event, out: list) -> None:
    """Read a blob over plain HTTP: ``first`` bytes (then ``got_first`` is set), then the rest;
    ``out`` gets the bytes, or the exception that ended the read."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request("GET", f"/v1/blobs/{blob_id}", headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        head = response.read(first)
        got_first.set()
        out.append(head + response.read())
    except Exception as exc:  # noqa: BLE001 - the test looks at it
        out.append(exc)
    finally:
        conn.close()


def test_a_task_goes_ahead_of_its_arguments_and_readers_follow_their_upload(small: LocalStack) -> None:
    """A task is sent as soon as its large arguments are declared: its endpoint's download (and
    any reader's) follows the upload as the bytes arrive, instead of waiting for it to end. A
    reader whose upload breaks off sees its body end short; asking again, it reads the bytes
    sent again, checked."""
    value = os.urandom(4 * MiB)
    data = serialize(((value,), {}))
    blobs = BlobClient(small.service_url, {"Authorization": f"Bearer {small.token}"})
    ref = blobs.declare(len(data), digest_of(data))
    body = serialize(helpers.sha256_hex)
    client = raw_client(small.service_url, small.token)
    tid = str(uuid.uuid4())
    try:
        client.send(Submit(ref=1, functions={function_id(body): body}, tasks=[Task(
            id=tid, function=function_id(body), endpoint=small.endpoint_id, payload=blob_stub(ref), blobs=[ref.id])]))
        ack, _ = client.recv_until(lambda m: isinstance(m, SubmitAck))
        assert ack.accepted == [tid]  # named before a byte of it was sent
    finally:
        client.close()
    put = httpx.Client(base_url=small.service_url, headers={"Authorization": f"Bearer {small.token}"},
                       trust_env=False, timeout=60)

    # an upload that breaks off: a reader following it has its first bytes, then a short body
    got_first, out = threading.Event(), []
    reader = threading.Thread(target=_follow, args=(small.service_url, small.token, ref.id, MiB, got_first, out))
    reader.start()

    def breaks_off() -> Iterator[bytes]:
        yield data[: 2 * MiB]
        assert got_first.wait(30), "the reader did not get bytes of an upload under way"
        raise RuntimeError("the uploader stops")

    with pytest.raises(RuntimeError, match="the uploader stops"):
        put.put(f"/v1/blobs/{ref.id}", content=breaks_off(), headers={"Content-Length": str(len(data))})
    reader.join(60)
    assert isinstance(out[0], http.client.IncompleteRead), out

    # the same blob sent again: a reader that asked (before it started) follows it to the end
    got_first, out = threading.Event(), []
    reader = threading.Thread(target=_follow, args=(small.service_url, small.token, ref.id, MiB, got_first, out))
    reader.start()
    loaded: list = []
    loader = threading.Thread(target=lambda: loaded.append(blobs.load(ref)))
    loader.start()

    def in_two_halves() -> Iterator[bytes]:
        yield data[: 2 * MiB]
        # the reader has bytes while the rest is not sent yet: the service passes them on as they arrive
        assert got_first.wait(30), "the reader did not get bytes of an upload under way"
        yield data[2 * MiB :]

    assert put.put(f"/v1/blobs/{ref.id}", content=in_two_halves(),
                   headers={"Content-Length": str(len(data))}).status_code == 200
    reader.join(60)
    loader.join(60)
    assert out == [data] and loaded == [((value,), {})]
    # and the endpoint, which got the task before the bytes, ran it on them
    assert wait_for(lambda: Client(small.service_url, small.token).get_task(tid)["state"] == "success", timeout=60)
    assert Client(small.service_url, small.token).get_result(tid) == hashlib.sha256(value).hexdigest()
    collector = raw_client(small.service_url, small.token)
    try:  # collected: the task and its blob expire (the module's later tests count the blobs)
        collector.send(Collected(ids=[tid]))
        wait_for(lambda: ref.id not in [p.name for p in _blob_files(small)], timeout=30,
                 what="the collected task's blob to go")
    finally:
        collector.close()


def test_a_reader_following_an_upload_that_lies_about_its_hash_never_gets_the_whole_body(small: LocalStack) -> None:
    """Readers do not hash what they download (the service did, as the bytes arrived): so the last
    byte of an upload under way waits for that check, and a follower of bytes that do not match
    their declared digest sees its body end short, whole but for nothing it could take for good."""
    data = os.urandom(3 * MiB)
    http_ = httpx.Client(base_url=small.service_url, headers={"Authorization": f"Bearer {small.token}"},
                         trust_env=False, timeout=60)
    blob_id = http_.post("/v1/blobs", json={"size": len(data), "digest": "f" * 64}).json()["blob_id"]
    got_first, out = threading.Event(), []
    reader = threading.Thread(target=_follow, args=(small.service_url, small.token, blob_id, MiB, got_first, out))
    uploaded = threading.Event()

    def follows_then_ends() -> Iterator[bytes]:
        yield data[: 2 * MiB]
        reader.start()  # the reader asks while the upload is under way
        assert got_first.wait(30), "the reader did not get bytes of an upload under way"
        yield data[2 * MiB :]
        uploaded.set()

    try:
        answer = http_.put(f"/v1/blobs/{blob_id}", content=follows_then_ends(),
                           headers={"Content-Length": str(len(data))})
        assert uploaded.is_set() and answer.status_code == 409 and "not to the" in answer.json()["detail"]
        reader.join(60)
        assert isinstance(out[0], http.client.IncompleteRead), out
        assert len(out[0].partial) + MiB < len(data)  # (it had MiB before; never the last byte)
    finally:
        http_.delete(f"/v1/blobs/{blob_id}")
        http_.close()


def test_a_worker_beside_its_daemon_reads_large_arguments_from_the_service(small: LocalStack, tmp_path: Path) -> None:
    """The process engine's workers read a task's large arguments from the service themselves
    (as they are uploaded): the daemon writes no ``<task>.args`` file for them to read back."""
    started, go = tmp_path / "started", tmp_path / "go"
    with _executor(small) as ex:
        fut = ex.submit(helpers.touch_then_wait, str(started), str(go), b"a" * (10 * MiB))  # over any threshold
        wait_for(started.exists, timeout=60, what="the task to start")
        downloaded = sorted(p.name for p in (small.endpoint_dir() / "blobs").glob("*.args*"))
        go.touch()
        assert fut.result(timeout=60) == 10 * MiB
    assert downloaded == []


def test_blobs_are_readable_only_by_their_owner_and_the_endpoint_running_their_task(small: LocalStack) -> None:
    data = b"secret" * MiB
    mine = BlobClient(small.service_url, {"Authorization": f"Bearer {small.token}"}).upload(
        data, len(data), digest_of(data))
    mallory = _user(small, f"mallory-{uuid.uuid4().hex[:6]}")
    theirs = httpx.Client(base_url=small.service_url, headers={"Authorization": f"Bearer {mallory}"},
                          trust_env=False)
    assert theirs.get(f"/v1/blobs/{mine.id}").status_code == 404
    assert theirs.delete(f"/v1/blobs/{mine.id}").status_code == 404
    # her own endpoint's credential cannot read it either: no task dispatched to it names the blob
    cred = Client(small.service_url, mallory).register_endpoint("evil")
    as_endpoint = theirs.get(f"/v1/blobs/{mine.id}", headers={"Authorization": f"Bearer {cred['secret']}",
                                                              "X-Tether-Endpoint": cred["endpoint_id"]})
    assert as_endpoint.status_code == 404
    # nor can a task of hers name it (the submitter must own every blob a task names)
    body = serialize(helpers.identity)
    thief = raw_client(small.service_url, mallory)
    try:
        tid = str(uuid.uuid4())
        thief.send(Submit(ref=1, functions={function_id(body): body},
                          tasks=[Task(id=tid, function=function_id(body), endpoint=cred["endpoint_id"],
                                      payload=blob_stub(mine), blobs=[mine.id])]))
        ack, _ = thief.recv_until(lambda m: isinstance(m, SubmitAck))
        assert ack.accepted == [] and ack.rejected[tid].code == ErrorCode.UNKNOWN_BLOB
        assert "is not one of your uploads" in ack.rejected[tid].message
    finally:
        thief.close()
    with _executor(small) as ex:  # the owner's own endpoint reads her blobs while it runs her task
        running = ex.submit(helpers.sleep_then, 2.0, "done")
        assert ex.submit(helpers.sha256_hex, data).result(timeout=60) == hashlib.sha256(data).hexdigest()
        # an endpoint stores result blobs only for tasks it holds: not for another endpoint's task
        forged = theirs.post("/v1/blobs", json={"size": 10, "digest": "0" * 64, "task_id": running.task_id},
                             headers={"Authorization": f"Bearer {cred['secret']}",
                                      "X-Tether-Endpoint": cred["endpoint_id"]})
        assert forged.status_code == 404 and "no open task with this id is dispatched to this endpoint" in forged.text
        assert theirs.post("/v1/blobs", json={"size": 10, "digest": "0" * 64, "task_id": running.task_id}
                           ).status_code == 403  # a user token never stores a task's result
        assert running.result(timeout=60) == "done"
    assert httpx.delete(f"{small.service_url}/v1/blobs/{mine.id}", headers={"Authorization": f"Bearer {small.token}"},
                        trust_env=False).status_code == 204


def test_an_endpoint_limit_fails_the_task_in_words_and_blobs_expire(small: LocalStack) -> None:
    config = small.endpoint_dir() / "config.yaml"
    original = config.read_text()
    small.stop_endpoint()
    config.write_text(original + f"max_payload_bytes: {8 * MiB}\n")
    small.start_endpoint()
    try:
        with _executor(small) as ex:
            with pytest.raises(PayloadTooLarge, match=r"over this endpoint's max_payload_bytes \(8388608\)"):
                ex.submit(helpers.identity, b"e" * (10 * MiB)).result(timeout=60)
            assert ex.submit(helpers.identity, b"f" * (3 * MiB)).result(timeout=60) == b"f" * (3 * MiB)
    finally:
        small.stop_endpoint()
        config.write_text(original)
        small.start_endpoint()
    wait_for(lambda: not _blob_files(small), timeout=30, what="collected tasks' blobs to be deleted")


def _postgres_missing() -> str | None:
    try:
        import psycopg

        psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", connect_timeout=3).close()
    except Exception as exc:  # noqa: BLE001 - not installed, or no server: the reason is the skip message
        return f"no PostgreSQL on 127.0.0.1:5432 with trust auth ({str(exc).strip()[:120]})"
    return None


@pytest.mark.skipif(bool(_postgres_missing()) and not os.environ.get("CI"), reason=str(_postgres_missing()))
def test_blobs_work_the_same_on_postgres(tmp_path: Path) -> None:
    import psycopg

    name = f"tether_blobs_{uuid.uuid4().hex[:10]}"
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        with local_stack(tmp_path / "home", engine="process", workers=1,
                         service_args=("--db-url", f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}",
                                       "--blob-threshold-bytes", str(MiB), "--max-blob-bytes", str(32 * MiB),
                                       "--result-retention", "1", "--purge-interval", "0.5")) as stack:
            with _executor(stack) as ex:
                data = os.urandom(5 * MiB)
                assert ex.submit(helpers.sha256_hex, data).result(timeout=60) == hashlib.sha256(data).hexdigest()
                assert ex.submit(helpers.blob, 3 * MiB).result(timeout=60) == b"x" * (3 * MiB)
                with pytest.raises(PayloadTooLarge, match="per blob"):
                    ex.submit(helpers.identity, b"o" * (40 * MiB)).result(timeout=60)
            wait_for(lambda: not _blob_files(stack), timeout=30, what="the blobs to expire with their tasks")
    finally:
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
