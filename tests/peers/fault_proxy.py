"""An HTTP reverse proxy between the node and the cloud PACS that breaks the link on demand.

The link from a clinic fails in ways a healthy Orthanc never shows: a 503 from a
load balancer, an answer lost after the cloud stored the upload, a connection cut
half-way through an 18 MB body, a link that hangs or crawls. :class:`FaultProxy`
sits on loopback in front of a real upstream (Orthanc's REST and DICOMweb) and does
one of those per request, while recording what each request carried and whether the
upstream got it, so a test can tell "stored once" from "stored twice".

It runs its own event loop in a background thread, so synchronous tests and node
subprocesses can both use it::

    with FaultProxy(orthanc.base_url) as proxy:
        node = node_factory(cloud={"dicomweb_url": proxy.url + "/dicom-web"})
        proxy.fail_next(1, "reset_after_body")
        ...
        assert proxy.stored_uploads()[sop_uid] == 1

Bodies are streamed through in chunks, never held whole: a STOW-RS body is teed to a
temp file and its parts' SOP Instance UIDs are read from there after the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, Any

import aiohttp
from aiohttp import web
from pydicom import dcmread

log = logging.getLogger(__name__)

MODES = ("pass", "status", "hang", "reset_mid_body", "reset_after_body", "slow", "down")
CHUNK = 64 * 1024
# Headers that belong to one hop, not to the request or answer (RFC 9110 7.6.1).
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "transfer-encoding", "upgrade", "host"}
)
_DICOM_PREFIX = 256 * 1024
"""Bytes of a part read for its header; a DR image's attributes before Pixel Data are far fewer."""
_HANG_MAX_S = 600.0
"""A hung request is released after this long even if the client never gives up."""


@dataclass
class RequestRecord:
    """One request as the proxy saw it.

    ``status`` is what the client was answered, None when it got no answer (reset,
    hang, down). ``forwarded`` is True when the whole request reached the upstream
    and the upstream answered (``upstream_status``), whatever the client then got.
    ``sop_instance_uids`` lists the DICOM parts of a multipart/related POST body
    that arrived whole.
    """

    method: str
    path: str
    mode: str
    content_type: str = ""
    status: int | None = None
    body_bytes: int = 0
    forwarded: bool = False
    upstream_status: int | None = None
    sop_instance_uids: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    error: str = ""

    @property
    def is_stow(self) -> bool:
        """A STOW-RS upload: a multipart/related POST."""
        return self.method == "POST" and self.content_type.lower().startswith("multipart/related")


class FaultProxy:
    """A reverse proxy to ``upstream`` (e.g. ``http://127.0.0.1:8042``) on a free loopback port.

    ``set_mode`` and ``fail_next`` take effect from the next request; modes and their
    options:

    ``pass``
        forward unchanged.
    ``status``
        answer ``status`` (default 503) with ``body`` (default a short JSON message)
        after reading the request. ``forward=True`` forwards it first, so the
        upstream stored it but its answer is replaced: a lost success.
        ``retry_after`` adds a Retry-After header.
    ``hang``
        read the whole request, forward it when ``forward=True``, then never answer
        until the client gives up (or ``seconds``, default 600, pass).
    ``reset_mid_body``
        read ``after_bytes`` (default 64 KiB) of the body, then abort the TCP connection.
    ``reset_after_body``
        forward the whole request (the upstream stores it), then abort the connection
        without answering: the ambiguous failure.
    ``slow``
        forward, reading the request body at no more than ``bps`` bytes/s.
    ``down``
        abort every connection as soon as its request arrives.
    """

    def __init__(self, upstream: str, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream = upstream.rstrip("/")
        self.host = host
        self.port = port
        self._mode: tuple[str, dict[str, Any]] = ("pass", {})
        self._next: list[tuple[int, str, dict[str, Any]]] = []
        self._records: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._closing: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """Where clients connect, e.g. ``http://127.0.0.1:40123`` (no trailing slash)."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> FaultProxy:
        """Start serving in a background thread; returns once the port listens."""
        if self._thread is not None:
            return self
        self._ready.clear()
        self._thread = threading.Thread(target=self._serve, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start within 10 s")
        if self._startup_error is not None:
            self._thread.join(5)
            self._thread = None
            raise RuntimeError(f"fault proxy could not start: {self._startup_error}") from self._startup_error
        return self

    def stop(self) -> None:
        """Release hung requests, close the listener and the loop (bounded)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            with contextlib.suppress(Exception):
                future.result(15)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._thread = None
        self._loop = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._setup())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._startup_error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    async def _setup(self) -> None:
        self._closing = asyncio.Event()
        # No timeout on the whole request: a slow mode may take minutes; connects fail fast.
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            auto_decompress=False,
            connector=aiohttp.TCPConnector(force_close=True),
        )
        server = web.Server(self._handle, access_log=None)
        self._runner = web.ServerRunner(server, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        sockets = self._runner.addresses
        self.port = int(sockets[0][1])

    async def _shutdown(self) -> None:
        assert self._closing is not None
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    # ------------------------------------------------------------ faults

    def set_mode(self, mode: str, **opts: Any) -> None:
        """The mode for every request from the next one on (see the class docstring)."""
        _check_mode(mode)
        with self._lock:
            self._mode = (mode, opts)

    def fail_next(self, n: int, mode: str, **opts: Any) -> None:
        """The next ``n`` requests get ``mode``; after them, the current mode again."""
        _check_mode(mode)
        if n < 1:
            raise ValueError("n must be at least 1")
        with self._lock:
            self._next.append((n, mode, opts))

    def _take_mode(self) -> tuple[str, dict[str, Any]]:
        with self._lock:
            if self._next:
                n, mode, opts = self._next[0]
                if n <= 1:
                    self._next.pop(0)
                else:
                    self._next[0] = (n - 1, mode, opts)
                return mode, opts
            return self._mode

    # ------------------------------------------------------------ records

    @property
    def requests(self) -> list[RequestRecord]:
        """Every request so far, oldest first (a snapshot; records of running requests still change)."""
        with self._lock:
            return list(self._records)

    def clear(self) -> None:
        """Forget recorded requests (the mode is kept)."""
        with self._lock:
            self._records.clear()

    def stored_uploads(self) -> Counter[str]:
        """SOP Instance UID -> how many STOW-RS requests carrying it were forwarded to the upstream."""
        counts: Counter[str] = Counter()
        for record in self.requests:
            if record.is_stow and record.forwarded:
                counts.update(record.sop_instance_uids)
        return counts

    def wait_for(self, count: int, timeout: float = 30.0, *, finished: bool = True) -> list[RequestRecord]:
        """Wait until ``count`` requests were recorded (and, by default, have finished)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = self.requests
            done = [r for r in records if r.finished is not None] if finished else records
            if len(done) >= count:
                return records
            time.sleep(0.02)
        raise TimeoutError(f"{len(self.requests)} request(s) seen, {count} expected within {timeout}s")

    # ------------------------------------------------------------ handling

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        mode, opts = self._take_mode()
        record = RequestRecord(request.method, request.path_qs, mode, request.headers.get("Content-Type", ""))
        with self._lock:
            self._records.append(record)
        tee = _BodyTee(record) if record.is_stow else None
        try:
            return await self._dispatch(request, mode, opts, record, tee)
        except _Aborted:
            return web.Response(status=499)  # never written: the transport is gone
        except (ConnectionError, aiohttp.ClientPayloadError, asyncio.CancelledError) as exc:
            record.error = record.error or f"{type(exc).__name__}: {exc}"
            _abort(request)
            return web.Response(status=499)
        finally:
            if tee is not None:
                record.sop_instance_uids = await asyncio.to_thread(tee.finish)
            record.finished = time.monotonic()
            log.debug("fault proxy %s %s [%s] -> %s", record.method, record.path, mode, record.status)

    async def _dispatch(
        self, request: web.BaseRequest, mode: str, opts: dict[str, Any], record: RequestRecord, tee: _BodyTee | None
    ) -> web.StreamResponse:
        if mode == "down":
            record.error = "down: connection aborted on arrival"
            _abort(request)
            raise _Aborted
        if mode == "reset_mid_body":
            after = int(opts.get("after_bytes", CHUNK))
            while record.body_bytes < after:
                chunk = await request.content.read(min(CHUNK, after - record.body_bytes))
                if not chunk:
                    break
                record.body_bytes += len(chunk)
                if tee is not None:
                    tee.write(chunk)
            record.error = f"reset after {record.body_bytes} body bytes"
            if tee is not None:
                tee.incomplete = True
            _abort(request)
            raise _Aborted
        if mode == "status" and not opts.get("forward", False):
            await _drain(request, record, tee)
            return _error_response(record, opts)
        if mode == "hang" and not opts.get("forward", False):
            await _drain(request, record, tee)
            await self._hang(request, record, opts)
            raise _Aborted
        bps = int(opts.get("bps", 0)) if mode == "slow" else 0
        upstream = await self._forward(request, record, tee, bps)
        if upstream is None:  # the upstream could not be reached: a gateway's answer
            record.status = 502
            return web.json_response({"Message": f"fault proxy: upstream unreachable: {record.error}"}, status=502)
        async with upstream:
            if mode == "pass" or mode == "slow":
                return await _relay(request, upstream, record)
            await upstream.read()  # the upstream's answer, which the client will not see
        if mode == "status":
            return _error_response(record, opts)
        if mode == "hang":
            await self._hang(request, record, opts)
            raise _Aborted
        if mode == "reset_after_body":
            record.error = "reset after the upstream answered"
            _abort(request)
            raise _Aborted
        raise AssertionError(f"unhandled mode {mode}")

    async def _forward(
        self, request: web.BaseRequest, record: RequestRecord, tee: _BodyTee | None, bps: int
    ) -> aiohttp.ClientResponse | None:
        """Send the request upstream with its body streamed (and teed); None when unreachable."""
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        body = _body_chunks(request, record, tee, bps) if request.can_read_body else None
        try:
            response = await self._session.request(
                request.method, self.upstream + request.path_qs, headers=headers, data=body,
                allow_redirects=False, skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
            )
        except aiohttp.ClientConnectorError as exc:
            record.error = str(exc)
            await _drain(request, record, tee)
            return None
        except aiohttp.ClientError as exc:
            if not request.content.at_eof() or (request.transport is None or request.transport.is_closing()):
                raise ConnectionResetError(f"client went away mid-request: {exc}") from exc
            record.error = str(exc)
            return None
        record.forwarded = True
        record.upstream_status = response.status
        return response

    async def _hang(self, request: web.BaseRequest, record: RequestRecord, opts: dict[str, Any]) -> None:
        """Answer nothing until the client closes, the proxy stops, or ``seconds`` pass."""
        assert self._closing is not None
        record.error = "hung: no answer"
        deadline = time.monotonic() + float(opts.get("seconds", _HANG_MAX_S))
        while time.monotonic() < deadline and not self._closing.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), 0.05)
        _abort(request)


class _Aborted(Exception):
    """The client's connection was aborted on purpose; nothing is to be answered."""


class _BodyTee:
    """A STOW-RS body copied to a temp file as it streams, read for SOP Instance UIDs afterwards."""

    def __init__(self, record: RequestRecord) -> None:
        self.boundary = _boundary(record.content_type)
        self.file: IO[bytes] = tempfile.TemporaryFile(prefix="fault-proxy-")
        self.incomplete = False

    def write(self, chunk: bytes) -> None:
        self.file.write(chunk)

    def finish(self) -> list[str]:
        try:
            if self.incomplete or not self.boundary:
                return []
            self.file.flush()
            return _sop_uids(self.file, self.boundary)
        finally:
            self.file.close()


async def _body_chunks(
    request: web.BaseRequest, record: RequestRecord, tee: _BodyTee | None, bps: int
) -> AsyncIterator[bytes]:
    size = CHUNK if bps <= 0 else max(1024, min(CHUNK, bps // 20))
    started = time.monotonic()
    while True:
        chunk = await request.content.read(size)
        if not chunk:
            break
        record.body_bytes += len(chunk)
        if tee is not None:
            tee.write(chunk)
        if bps > 0:
            ahead = record.body_bytes / bps - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)
        yield chunk
    if tee is not None and not request.content.is_eof():
        tee.incomplete = True


async def _drain(request: web.BaseRequest, record: RequestRecord, tee: _BodyTee | None) -> None:
    """Read the rest of the request body (as a server does before it answers)."""
    while chunk := await request.content.read(CHUNK):
        record.body_bytes += len(chunk)
        if tee is not None:
            tee.write(chunk)


async def _relay(request: web.BaseRequest, upstream: aiohttp.ClientResponse, record: RequestRecord) -> web.StreamResponse:
    """Stream the upstream's answer back unchanged."""
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    for key, value in upstream.headers.items():
        if key.lower() not in _HOP_BY_HOP:
            response.headers.add(key, value)
    record.status = upstream.status
    await response.prepare(request)
    async for chunk in upstream.content.iter_chunked(CHUNK):
        await response.write(chunk)
    await response.write_eof()
    return response


def _error_response(record: RequestRecord, opts: dict[str, Any]) -> web.Response:
    status = int(opts.get("status", 503))
    body = opts.get("body", f'{{"Message": "fault proxy: injected HTTP {status}"}}')
    headers = {"Content-Type": opts.get("content_type", "application/json")}
    if "retry_after" in opts:
        headers["Retry-After"] = str(opts["retry_after"])
    record.status = status
    return web.Response(status=status, body=body.encode() if isinstance(body, str) else body, headers=headers)


def _abort(request: web.BaseRequest) -> None:
    """Drop the client's TCP connection at once (RST when unread data remains)."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")


def _boundary(content_type: str) -> bytes:
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "boundary":
            return value.strip().strip('"').encode("latin-1")
    return b""


def _delimiter_offsets(file: IO[bytes], delimiter: bytes) -> list[int]:
    """Offsets of every ``delimiter`` in the file, scanning it in 1 MiB windows."""
    offsets: list[int] = []
    file.seek(0)
    base, carry = 0, b""
    while block := file.read(1024 * 1024):
        window = carry + block
        start = 0
        while (hit := window.find(delimiter, start)) >= 0:
            offsets.append(base - len(carry) + hit)
            start = hit + len(delimiter)
        keep = min(len(window), len(delimiter) - 1)
        # Never re-find a hit that lies (partly) in the carried tail.
        tail_start = max(len(window) - keep, start)
        carry = window[tail_start:]
        base += len(block)
    return offsets


def _sop_uids(file: IO[bytes], boundary: bytes) -> list[str]:
    """SOPInstanceUIDs of the DICOM parts of a multipart body held in ``file``."""
    delimiter = b"--" + boundary
    offsets = _delimiter_offsets(file, delimiter)
    uids: list[str] = []
    for here, following in zip(offsets, offsets[1:]):
        file.seek(here + len(delimiter))
        head = file.read(4096)
        if head.startswith(b"--"):
            break  # the close delimiter
        end_of_headers = head.find(b"\r\n\r\n")
        if end_of_headers < 0:
            continue
        start = here + len(delimiter) + end_of_headers + 4
        end = following - 2  # the CRLF before the next delimiter belongs to it
        if end <= start:
            continue
        for size in (min(end - start, _DICOM_PREFIX), end - start):
            file.seek(start)
            try:
                ds = dcmread(io.BytesIO(file.read(size)), stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
                uid = str(ds.SOPInstanceUID)
            except Exception:  # noqa: BLE001 - a truncated prefix, or not DICOM at all
                continue
            uids.append(uid)
            break
    return uids
