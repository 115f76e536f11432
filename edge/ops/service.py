"""``edge serve ops``: the heartbeat, the textfile and the zeroconf records, once per node.

Its own service (and systemd unit) rather than part of the console: it speaks for the
whole node, so it must run exactly once whichever services run where; everything it
sends comes from the store and port probes, so it is right from any process; and a
multicast or uplink problem here can never take the DICOM listener or the console down.
It starts last and stops first, so records are withdrawn before the ports close.
"""

from __future__ import annotations

import asyncio
import logging

from edge.service import BackgroundTasks, ServiceSetupError
from edge.node.config import EdgeConfig
from edge.ops.discovery import Announcer
from edge.ops.heartbeat import Heartbeat, HeartbeatSetupError

log = logging.getLogger(__name__)

ANNOUNCE_REFRESH_S = 10.0
"""How often zeroconf records are brought in step with which ports are up."""


class OpsSetupError(ServiceSetupError):
    """[ops] settings that cannot work; the message names the key."""


class OpsService:
    name = "ops"

    def __init__(self, config: EdgeConfig, services: tuple[str, ...] = ("dicom", "sync")) -> None:
        """``services``: what the node's health covers (all core services, wherever they run)."""
        self.config = config
        self.services = services
        self.announcer: Announcer | None = None
        self._tasks = BackgroundTasks("ops")

    async def start(self) -> None:
        try:
            heartbeat = Heartbeat(self.config, self.services)
        except HeartbeatSetupError as exc:
            raise OpsSetupError(str(exc)) from None
        if heartbeat.enabled:
            self._tasks.start(heartbeat.run(), name="heartbeat")
        else:
            log.info("heartbeat: off ([ops] pushgateway_url and textfile_dir are empty)")
        if self.config.ops.zeroconf:
            announcer = Announcer(self.config)
            try:
                await announcer.start()
            except (OSError, ValueError) as exc:  # discovery is a convenience: never stop ingest for it
                log.error("zeroconf: cannot announce on %s: %s", self.config.ops.zeroconf_interfaces or "all interfaces", exc)
            else:
                self.announcer = announcer
                self._tasks.start(self._refresh_loop(announcer), name="zeroconf")

    async def _refresh_loop(self, announcer: Announcer) -> None:
        while True:
            await asyncio.sleep(ANNOUNCE_REFRESH_S)
            try:
                await announcer.refresh()
            except Exception:
                log.exception("zeroconf: refresh failed; trying again in %.0fs", ANNOUNCE_REFRESH_S)

    async def stop(self) -> None:
        await self._tasks.stop()
        if self.announcer is not None:
            try:
                await self.announcer.stop()
            except Exception as exc:  # noqa: BLE001 - stopping must finish; the records expire by TTL
                log.warning("zeroconf: could not withdraw cleanly: %s", exc)
            self.announcer = None
        log.info("ops: stopped")
