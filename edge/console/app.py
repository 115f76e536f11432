"""Console HTTP app: the technician console (edge.console.web) plus ``GET /healthz`` and ``GET /metrics``.

Health and metrics stay unauthenticated for ops; everything else needs a login.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from edge.node.config import EdgeConfig
from edge.http_server import HttpLimits, HttpListener, serve_app
from edge.ops.health import health_report, run_checks
from edge.console.web import add_routes
from edge.ops.metrics import register_store_collector

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", EdgeConfig)
SERVICES = web.AppKey("services", tuple)


async def healthz(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    checks = await asyncio.to_thread(run_checks, config, request.app[SERVICES])
    healthy, body = health_report(config, checks)
    return web.json_response(body, status=200 if healthy else 503)


async def metrics(request: web.Request) -> web.Response:
    payload = await asyncio.to_thread(generate_latest, REGISTRY)
    return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_app(
    config: EdgeConfig, services: tuple[str, ...] = ("dicom",), wake_sync: Callable[[], None] | None = None
) -> web.Application:
    """``services``: which of the node's services /healthz expects to be up; ``wake_sync``: nudge the uploader."""
    register_store_collector(config, services)
    app = web.Application()
    app[CONFIG] = config
    app[SERVICES] = services
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    add_routes(app, config, wake_sync)
    return app


class ConsoleService:
    """Runs the console app on [console] port; start()/stop() like every service."""

    name = "console"

    def __init__(
        self, config: EdgeConfig, services: tuple[str, ...] = ("dicom",), wake_sync: Callable[[], None] | None = None
    ) -> None:
        self.config = config
        self.services = services
        self.wake_sync = wake_sync
        self._listener: HttpListener | None = None

    async def start(self) -> None:
        from edge.console.tls import console_ssl_context

        ssl_context = console_ssl_context(self.config)  # None: plain http; a bad file stops start-up naming the key
        cfg = self.config.console
        limits = HttpLimits(cfg.http_header_timeout_s, cfg.http_keepalive_s, cfg.http_max_connections)
        self._listener = await serve_app(make_app(self.config, self.services, self.wake_sync), "console",
                                         cfg.bind_address, cfg.port, limits, ssl_context=ssl_context)
        log.info("console: listening on %s://%s:%d (console, /healthz, /metrics)",
                 "https" if ssl_context else "http", cfg.bind_address, cfg.port)

    async def stop(self) -> None:
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
            log.info("console: stopped")
