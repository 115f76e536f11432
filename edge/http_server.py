"""Where the console and the kiosk listen: one aiohttp server setup that a hostile LAN cannot exhaust.

aiohttp alone keeps a connection that never finishes its request head, accepts any number
of them, and logs every malformed request with a traceback. On the clinic LAN that let
~1000 slow connections take the process past its descriptor limit. So each connection here
must send its request head within ``header_timeout_s`` (a timer from accept, cancelled at
the blank line ending the head), idles at most ``keepalive_s`` between requests, and
beyond ``max_connections`` a new connection gets a 503 and is closed at once. A malformed
request is one log line with the peer's address.

The guard wraps the protocol aiohttp's server makes for each connection and touches only
asyncio's public protocol/transport calls, so it does not depend on aiohttp's internals.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import ssl
from dataclasses import dataclass
import typing
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger(__name__)

_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


@dataclass(frozen=True)
class HttpLimits:
    """One web app's limits, from its edge.toml section (``http_*`` keys)."""

    header_timeout_s: float
    keepalive_s: float
    max_connections: int


def raise_open_files_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: the connection cap, not 1024, should be what binds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)


def _one_line(exc: HttpProcessingError) -> str:
    """aiohttp's parse errors quote the raw bytes over several lines: keep the first, printable only."""
    lines = str(exc.message or "").strip().splitlines()
    first = lines[0] if lines else type(exc).__name__
    return "".join(ch if ch.isprintable() else "?" for ch in first)[:120]


class _QuietBadRequests(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server logger, but a malformed request is one warning line instead of a traceback."""

    def __init__(self, app_name: str) -> None:
        super().__init__(logging.getLogger(f"{__name__}.{app_name}"), {})
        self.app_name = app_name

    def log(self, level: int, msg: object, *args: Any, exc_info: Any = None, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            peer = args[0] if args else "?"
            self.logger.warning("%s: malformed HTTP request from %s: %s", self.app_name, peer, _one_line(exc_info))
            return
        super().log(level, msg, *args, exc_info=exc_info, **kwargs)


class _Guard:
    """Counts one app's open connections and says once when it starts and stops turning them away."""

    def __init__(self, name: str, limits: HttpLimits, make_handler: Any) -> None:
        self.name = name
        self.limits = limits
        self.make_handler = make_handler
        self.open = 0
        self.refused = 0

    def __call__(self) -> asyncio.Protocol:
        return _GuardedConnection(self)

    def refuse(self) -> None:
        if self.refused == 0:
            log.warning("%s: %d connections open (the cap); closing new ones until some end", self.name, self.open)
        self.refused += 1

    def accept(self) -> None:
        if self.refused:
            log.info("%s: accepting connections again (%d refused meanwhile)", self.name, self.refused)
            self.refused = 0
        self.open += 1


class _GuardedConnection(asyncio.Protocol):
    """One connection: capped at accept, closed if its first request head is late, else aiohttp's."""

    def __init__(self, guard: _Guard) -> None:
        self._guard = guard
        self._handler: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        if guard.open >= guard.limits.max_connections:
            guard.refuse()
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(_BUSY)
            transport.close()
            return
        guard.accept()
        self._transport = typing.cast(asyncio.Transport, transport)  # a stream server's is always a Transport
        self._head_timer = asyncio.get_running_loop().call_later(guard.limits.header_timeout_s, self._head_late)
        self._handler = guard.make_handler()
        self._handler.connection_made(transport)

    def _head_late(self) -> None:
        self._head_timer = None
        if self._transport is not None:
            log.debug("%s: closed a connection from %s: no request head within %.1f s", self._guard.name,
                      self._transport.get_extra_info("peername"), self._guard.limits.header_timeout_s)
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is not None:
            seen = self._tail + data
            if b"\r\n\r\n" in seen or b"\n\n" in seen:
                self._head_timer.cancel()
                self._head_timer = None
            else:
                self._tail = seen[-3:]
        if self._handler is not None:
            self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self._handler.eof_received() if self._handler is not None else None

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._handler is None:
            return
        self._guard.open -= 1
        self._transport = None
        handler, self._handler = self._handler, None
        handler.connection_lost(exc)


class HttpListener:
    """A running web app: its aiohttp runner and its guarded listening socket; ``close()`` stops both."""

    def __init__(self, runner: web.AppRunner, server: asyncio.AbstractServer, guard: _Guard) -> None:
        self.runner = runner
        self.server = server
        self._guard = guard

    @property
    def open_connections(self) -> int:
        return self._guard.open

    async def close(self) -> None:
        self.server.close()
        await self.runner.cleanup()  # closes idle connections, waits shutdown_timeout for busy ones


async def serve_app(
    app: web.Application,
    name: str,
    host: str,
    port: int,
    limits: HttpLimits,
    ssl_context: ssl.SSLContext | None = None,
) -> HttpListener:
    """Listen for ``app`` on host:port with the guard; https when ``ssl_context`` is given.

    ``OSError`` (port in use, address not here) reaches the caller as from ``TCPSite``.
    """
    raise_open_files_limit()
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0,
                           keepalive_timeout=limits.keepalive_s, logger=_QuietBadRequests(name))
    await runner.setup()
    assert runner.server is not None
    guard = _Guard(name, limits, runner.server)
    extra: dict[str, Any] = {}
    if ssl_context is not None:  # a stalled TLS handshake is a late request head too
        extra = {"ssl": ssl_context, "ssl_handshake_timeout": limits.header_timeout_s}
    try:
        server = await asyncio.get_running_loop().create_server(guard, host, port, backlog=128, **extra)
    except BaseException:
        await runner.cleanup()
        raise
    return HttpListener(runner, server, guard)
