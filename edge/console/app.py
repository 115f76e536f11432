"""Console HTTP app: ``GET /healthz`` (JSON, 503 when unhealthy) and ``GET /metrics``."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from edge.config import EdgeConfig
from edge.ops.health import health_report, run_checks
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


def make_app(config: EdgeConfig, services: tuple[str, ...] = ("dicom",)) -> web.Application:
    """``services``: which of the node's services /healthz expects to be up."""
    register_store_collector(config, services)
    app = web.Application()
    app[CONFIG] = config
    app[SERVICES] = services
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


class ConsoleService:
    """Runs the console app on [console] port; start()/stop() like every service."""

    name = "console"

    def __init__(self, config: EdgeConfig, services: tuple[str, ...] = ("dicom",)) -> None:
        self.config = config
        self.services = services
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(make_app(self.config, self.services), access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        cfg = self.config.console
        await web.TCPSite(self._runner, cfg.bind_address, cfg.port).start()
        log.info("console: listening on %s:%d (/healthz, /metrics)", cfg.bind_address, cfg.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            log.info("console: stopped")
