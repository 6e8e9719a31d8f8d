"""Moving blobs: arguments, results and function bodies too large for a WebSocket frame.

Shared by the client and the endpoint, which both talk to the service's ``/v1/blobs`` routes
over plain HTTP(S) with httpx, streaming: nothing here holds a blob whole in memory.

* What it moves was serialized into a :class:`~tether.spill.Spill` (memory while small, a
  file once large; not hashed there: an upload hashes as it sends, and a kept result may never
  be uploaded at all). The client's spills keep large ``bytes`` by reference: an upload
  streams them from memory.
* :class:`BlobClient` uploads in two steps, like S3's multipart or tus: ``POST /v1/blobs``
  declares the size, and the digest when it is known (the service refuses a blob over its
  limit, 413, or over the user's quota, 429, before any byte moves), then ``PUT /v1/blobs/{id}``
  streams the bytes; a blob declared without its digest is hashed as it is sent and its digest
  follows its last byte, so no pass over a gibibyte precedes the first byte moving.
  Downloads stream to a file, or into the value they make, and are checked for their size: the
  digest is checked once, by the service, where the bytes enter it (a reader following an upload
  gets its last byte only after that check), so each byte is hashed once per hop, not twice.
* :func:`file_stub` / :func:`load_file`: how the endpoint hands a downloaded blob to a worker
  (a path, not the bytes: the worker unpickles from the file); :func:`service_stub` /
  :func:`load_service_blob`: how it hands one to a worker beside it that reads the blob from
  the service itself.
* Large transfers show their progress (:class:`tether.progress.TransferProgress`).
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import certifi
import httpx
import msgspec

from .digest import new_digest
from .errors import AuthError, BlobCorrupt, PayloadTooLarge, QuotaExceeded, TetherError
from .progress import TransferProgress
from .protocol import DIGEST_HEADER, ERROR_HEADER, BlobRef, ErrorCode
from .serialize import deserialize_from
from .spill import CHUNK, PIECE, Spill, hash_and_write
from .urls import tls_context

log = logging.getLogger("tether.transfer")

BLOBS_PATH = "/v1/blobs"
#: times a client sends a declared blob before it gives up (network failures only)
SEND_ATTEMPTS = 3
#: times a download is tried before it gives up (network failures only)
DOWNLOAD_ATTEMPTS = 3
#: seconds a download may wait for its next bytes
DOWNLOAD_TIMEOUT_S = 300.0
#: bytes of the hex digest that follows a blob's bytes when it is declared at the end of the upload
DIGEST_AT_END = 64
#: the header of a local file stub (endpoint daemon -> its workers; never on the wire)
FILE_STUB_HEADER = b"tether:1;method=file\n"
#: the header of a service stub (endpoint daemon -> its workers on its host; never on the wire)
SERVICE_STUB_HEADER = b"tether:1;method=service\n"


# --- the HTTP side -----------------------------------------------------------------------------
def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail") or response.text)
    except ValueError:
        return response.text or response.reason_phrase


def _raise_for(response: httpx.Response, what: str) -> None:
    """A refusal as the matching typed error, with the service's words."""
    if response.status_code >= 400:
        _raise_for_status(response.status_code, response.headers.get(ERROR_HEADER), _detail(response), what)


def _raise_for_status(status: int, error_code: str | None, detail: str, what: str) -> None:
    if detail.startswith("{"):
        with contextlib.suppress(ValueError, AttributeError):
            detail = str(json.loads(detail).get("detail") or detail)
    cls = {401: AuthError, 413: PayloadTooLarge, 429: QuotaExceeded}.get(status, TetherError)
    if error_code == ErrorCode.BLOB_CORRUPT:
        cls = BlobCorrupt
    raise cls(f"{what}: {detail}")


class DownloadBrokeOff(OSError):
    """The body ended early: the connection broke, or the upload the service was passing on
    broke off. Asked again (:data:`DOWNLOAD_ATTEMPTS`)."""


#: network failures of a download that are worth another try
_RETRIED = (OSError, http.client.HTTPException)


class BlobReader(io.RawIOBase):
    """A blob's body as it arrives (at most ``PIECE`` bytes per read). :meth:`finish` checks its
    size; the content is the service's to vouch for: it hashed the bytes as they were uploaded and
    refused them unless they matched the declared digest, names that digest in its answer (checked
    here against the reference), and holds back the last byte of an upload still under way until
    it verified. Hashing again here cost a second pass over every byte for what TCP (or TLS)
    already guards."""

    def __init__(self, response: http.client.HTTPResponse, ref: BlobRef, what: str, progress: TransferProgress):
        super().__init__()
        self.response, self.ref, self.what, self.progress = response, ref, what, progress
        self.size = 0
        served = response.getheader(DIGEST_HEADER)
        if served and ref.digest and served != ref.digest:  # (no digest in ref: declared at the end of the upload)
            raise BlobCorrupt(f"{what} {ref.id}: the service holds bytes with digest {served}, expected "
                              f"{ref.digest}; it was not used")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")[:PIECE]
        try:
            n = self.response.readinto(view)
        except http.client.HTTPException as exc:  # IncompleteRead: the body ended early
            raise DownloadBrokeOff(f"{self.what} {self.ref.id}: the download broke off after {self.size} of "
                                   f"{self.ref.size} bytes ({type(exc).__name__})") from exc
        if n:
            self.size += n
            self.progress.update(n)
        elif self.size < self.ref.size:
            raise DownloadBrokeOff(f"{self.what} {self.ref.id}: the download ended after {self.size} of "
                                   f"{self.ref.size} bytes")
        return n

    def finish(self) -> None:
        """Read what is left (nothing, for a well-formed value) and check the size."""
        spare = bytearray(PIECE)
        while self.readinto(spare):
            pass
        if self.size != self.ref.size:
            raise BlobCorrupt(f"{self.what} {self.ref.id}: received {self.size} bytes, expected {self.ref.size}; "
                              "it was not used")


class BlobClient:
    """Upload and download blobs as a user (a bearer token) or as an endpoint (its credential).

    Thread-safe (one httpx client with a connection pool). Synchronous on purpose: the client
    calls it from user and worker threads, the endpoint from ``asyncio.to_thread``, so one
    implementation serves both and neither side's event loop ever waits on a disk or a socket.
    """

    def __init__(self, url: str, headers: dict[str, str], ssl_context: ssl.SSLContext | None = None,
                 progress: bool | None = None):
        self.url = url.rstrip("/")
        self.progress = progress
        self._headers = dict(headers)
        self._ssl = ssl_context or ssl.create_default_context(cafile=certifi.where())
        self._http = httpx.Client(base_url=self.url, headers=headers, verify=self._ssl, trust_env=False,
                                  timeout=httpx.Timeout(60.0, connect=10.0))

    def close(self) -> None:
        self._http.close()

    def upload(self, source: Path | bytes | Spill, size: int, digest: str | None, *, task_id: str | None = None,
               what: str = "blob", progress: bool | None = None) -> BlobRef:
        """Store ``source`` (a file, bytes, or a spilled :class:`Spill`) on the service; its size
        (and its digest, if known: else it is hashed as it is sent, see :meth:`send`) is declared
        first, so a refusal (413 too large, 429 over quota) costs no transfer."""
        ref = self.declare(size, digest, task_id=task_id, what=what)
        try:
            self.send(ref, source, what=what, progress=progress)
        except Exception:
            # given up: withdraw the declaration now rather than let it count against the quota until
            # it expires (a result's declaration, an endpoint's, goes with its task instead)
            with contextlib.suppress(httpx.HTTPError):
                self._http.delete(f"{BLOBS_PATH}/{ref.id}")
            raise
        return ref

    def declare(self, size: int, digest: str | None = None, *, task_id: str | None = None,
                what: str = "blob") -> BlobRef:
        """Declare a blob (``POST /v1/blobs``): the limits are checked, no byte moves. The
        reference may be handed on at once (a task naming its arguments, a kept result's answer):
        a reader's download follows the upload (:meth:`send`) as it happens. Without ``digest``
        the reference has none ("") and :meth:`send` declares it at the end of the upload."""
        body: dict[str, Any] = {"size": size}
        if digest:
            body["digest"] = digest
        if task_id is not None:
            body["task_id"] = task_id
        created = self._http.post(BLOBS_PATH, json=body)
        _raise_for(created, f"{what} ({size} bytes) refused by the service")
        return BlobRef(id=created.json()["blob_id"], size=size, digest=digest or "")

    def send(self, ref: BlobRef, source: Path | bytes | Spill, *, what: str = "blob", progress: bool | None = None,
             attempts: int = 1) -> None:
        """Stream a declared blob's bytes (``PUT /v1/blobs/{id}``). A network failure is tried
        again, up to ``attempts`` times in all (the declaration stays: the same blob is sent
        again, and a reader that was following it asks again); a refusal is raised at once.

        A blob declared without its digest is hashed piece by piece as it is sent (each piece
        while it is in the CPU's cache, on its way to the socket) and the hex digest follows
        its last byte: the service checks it there, before any reader gets that byte."""
        def once() -> None:
            shown = TransferProgress(f"upload {what}", ref.size, self.progress if progress is None else progress)
            body = self._chunks(source, shown)
            length = ref.size
            if not ref.digest:
                body, length = _digest_at_end(body), length + DIGEST_AT_END
            try:
                conn, response = self._request("PUT", ref.id, f"upload of {what} failed", body,
                                               {"Content-Length": str(length),
                                                "Content-Type": "application/octet-stream"})
                response.read()
                conn.close()
            finally:
                shown.close()

        _again_if_broken(once, f"upload of {what}", attempts)

    @staticmethod
    def _chunks(source: Path | bytes | Spill, progress: TransferProgress) -> Iterator[memoryview]:
        """The body in pieces that are views, not copies (the socket sends each before the next
        is made, so a file is read into one reused buffer)."""
        if isinstance(source, Spill):
            pieces = source.pieces()
        elif isinstance(source, bytes | bytearray | memoryview):
            view = memoryview(source)
            pieces = (view[start : start + PIECE] for start in range(0, len(view), PIECE))
        else:
            pieces = _file_pieces(Path(source))
        for piece in pieces:
            progress.update(len(piece))
            yield piece

    def _request(self, method: str, blob_id: str, refused: str, body: Iterator[memoryview] | None = None,
                 headers: dict[str, str] | None = None) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """``method /v1/blobs/{id}`` on a connection of its own; a refusal is raised in words,
        starting with ``refused``.

        The bytes of blobs go through the standard library's HTTP client, not httpx: it sends
        each piece as it is given and its response's ``readinto`` receives the body straight
        into the caller's buffer, where httpx (through h11) copies each piece once more on the
        way out and twice more on the way in; on a gibibyte that is seconds of CPU."""
        parts = urlsplit(self.url)
        if parts.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.hostname or "localhost", parts.port or 443, timeout=DOWNLOAD_TIMEOUT_S, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(parts.hostname or "localhost", parts.port or 80,
                                              timeout=DOWNLOAD_TIMEOUT_S)
        try:
            conn.request(method, f"{parts.path.rstrip('/')}{BLOBS_PATH}/{blob_id}", body=body,
                         headers={**self._headers, **(headers or {})})
            response = conn.getresponse()
            if response.status >= 400:
                detail = response.read(65536).decode(errors="replace")
                _raise_for_status(response.status, response.getheader(ERROR_HEADER), detail, refused)
        except BaseException:
            conn.close()
            raise
        return conn, response

    def download_to(self, ref: BlobRef, path: Path, what: str = "blob", progress: bool | None = None) -> Path:
        """Stream blob ``ref`` into ``path`` and check its size and digest (BlobCorrupt, and no
        file, if they differ)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")

        def once() -> None:
            with self.reader(ref, what, progress) as body, open(tmp, "wb") as out:
                buffer = bytearray(CHUNK)
                while n := body.readinto(buffer):  # each piece hashed (by the reader) and written while in the cache
                    out.write(memoryview(buffer)[:n])
                body.finish()

        try:
            _again_if_broken(once, f"download of {what}")
            os.replace(tmp, path)
            return path
        finally:
            tmp.unlink(missing_ok=True)

    def load(self, ref: BlobRef, what: str = "blob", progress: bool | None = None,
             allowed_methods: frozenset[str] | None = None) -> Any:
        """Download blob ``ref`` and deserialize it as it arrives: no file, and the bytes of a large
        value are received straight into the object they make. Checked like :meth:`download_to`;
        a value whose bytes do not match is dropped (BlobCorrupt)."""
        def once() -> Any:
            with self.reader(ref, what, progress) as body:
                value = deserialize_from(io.BufferedReader(body, PIECE), allowed_methods)
                body.finish()
            return value

        return _again_if_broken(once, f"download of {what}")

    @contextlib.contextmanager
    def reader(self, ref: BlobRef, what: str = "blob", progress: bool | None = None) -> Iterator[BlobReader]:
        """Blob ``ref``'s bytes as a raw binary file that counts what it reads."""
        shown = TransferProgress(f"download {what}", ref.size, self.progress if progress is None else progress)
        conn, response = self._request("GET", ref.id, f"download of {what} {ref.id} refused")
        try:
            yield BlobReader(response, ref, what, shown)
        finally:
            conn.close()
            shown.close()

    def delete(self, blob_id: str) -> None:
        _raise_for(self._http.delete(f"{BLOBS_PATH}/{blob_id}"), f"delete of blob {blob_id}")


def _digest_at_end(pieces: Iterator[memoryview]) -> Iterator[memoryview | bytes]:
    """``pieces``, each hashed before it is passed on, then their hex digest."""
    digest = new_digest()
    for piece in pieces:
        digest.update(piece)
        yield piece
    yield digest.hexdigest().encode()


def _again_if_broken(transfer: Callable[[], Any], what: str, attempts: int = 0) -> Any:
    """Run ``transfer`` (``attempts`` times at most: :data:`DOWNLOAD_ATTEMPTS` if not given), again
    while the network breaks it; a refusal or a bad digest is final."""
    attempts = attempts or DOWNLOAD_ATTEMPTS
    for attempt in range(attempts):
        try:
            return transfer()
        except TetherError:
            raise
        except _RETRIED as exc:
            if attempt == attempts - 1:
                raise
            log.warning("%s failed (%s); trying again", what, exc)
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


# --- endpoint daemon -> worker -------------------------------------------------------------------
def file_stub(path: Path, digest: str = "") -> bytes:
    """Stands for serialized data in a local file (a downloaded argument, a spilled result);
    ``digest``, when the writer knows it, spares the reader hashing the file again."""
    return FILE_STUB_HEADER + digest.encode() + b"\n" + os.fsencode(path)


def file_of(data: Any) -> tuple[Path, str] | None:
    """(the file a local file stub names, its digest or ""), or None for other data."""
    if isinstance(data, bytes) and data.startswith(FILE_STUB_HEADER) and len(data) < 8192:
        digest, _, path = data[len(FILE_STUB_HEADER):].partition(b"\n")
        return Path(os.fsdecode(path)), digest.decode()
    return None


class ServiceBlob(msgspec.Struct, array_like=True, frozen=True):
    """A blob a worker reads from the service itself, with its endpoint's credential: where the
    worker runs beside the daemon, arguments go from the service straight into the value they
    make, as they are uploaded, instead of through a file the daemon writes first."""

    url: str
    headers: dict[str, str]
    ca_file: str | None
    ref: BlobRef


_service_blob_decoder = msgspec.msgpack.Decoder(ServiceBlob)


def service_stub(url: str, headers: dict[str, str], ca_file: str | None, ref: BlobRef) -> bytes:
    """Stands for serialized data in blob ``ref``, read from the service by the worker."""
    return SERVICE_STUB_HEADER + msgspec.msgpack.encode(ServiceBlob(url, headers, ca_file, ref))


def service_blob_of(data: Any) -> ServiceBlob | None:
    """The blob a service stub names, or None for other data (a daemon makes these stubs, and
    refuses any payload from the wire whose header names a method it does not allow, as
    ``service`` never is)."""
    if isinstance(data, bytes) and data.startswith(SERVICE_STUB_HEADER) and len(data) < 16384:
        return _service_blob_decoder.decode(data[len(SERVICE_STUB_HEADER):])
    return None


_worker_clients: dict[tuple[str, str | None, tuple[tuple[str, str], ...]], BlobClient] = {}
_worker_clients_lock = threading.Lock()  # (a thread engine's tasks share the process)


def load_service_blob(blob: ServiceBlob, allowed_methods: frozenset[str] | None, what: str) -> Any:
    """Download and deserialize ``blob`` as it arrives (one client per service and credential
    in this process, so its connections are reused task after task)."""
    key = (blob.url, blob.ca_file, tuple(sorted(blob.headers.items())))
    with _worker_clients_lock:
        client = _worker_clients.get(key)
        if client is None:
            _worker_clients.clear()  # a rotated credential: the old client is no longer asked
            client = _worker_clients[key] = BlobClient(blob.url, blob.headers, tls_context(blob.url, blob.ca_file),
                                                       progress=False)
    return client.load(blob.ref, what, progress=False, allowed_methods=allowed_methods)


def _file_pieces(path: Path) -> Iterator[memoryview]:
    """A file in pieces of ``PIECE`` bytes read into one reused buffer (valid until the next)."""
    buffer = bytearray(PIECE)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            yield memoryview(buffer)[:n]


def load_file(path: Path, allowed_methods: frozenset[str] | None = None) -> Any:
    """Deserialize a file without reading it into memory first: pickle reads it into the
    objects it makes (see :func:`tether.serialize.deserialize_from`), so the value exists once
    in memory, not twice."""
    with open(path, "rb") as fh:
        return deserialize_from(fh, allowed_methods)


__all__ = ["BlobClient", "Spill", "TransferProgress", "file_of", "file_stub", "hash_and_write", "load_file"]
