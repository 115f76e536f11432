"""``edge serve bridge``: one BoxSession per serial port, from edge.toml and the by-id folder."""

from __future__ import annotations

import asyncio
import glob
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from edge.service import BackgroundTasks
from edge.store.spool import KeptInstance, Spool
from edge.store.walk import DecodeLimits
from firmware_bridge.boxes import forget_connections
from firmware_bridge.session import BoxSession

if TYPE_CHECKING:  # the whole config is the roof's; a part only reads it
    from edge.node.config import EdgeConfig

log = logging.getLogger(__name__)


class BridgeService:
    """start()/stop() like every service; idles quietly when there is no port to watch."""

    name = "bridge"

    def __init__(
        self,
        config: EdgeConfig,
        spool: Spool,
        on_kept: Callable[[KeptInstance], None] | None = None,
        make_room: Callable[[], object] | None = None,
    ) -> None:
        """``make_room``: frees disk by evicting what the cloud already holds (retention), tried
        before a recording is refused for ``[storage] min_free_mb``, as the DICOM service does."""
        self.config = config
        self.settings = config.bridge
        self.spool = spool
        self.on_kept = on_kept
        self.make_room = make_room
        self.sessions: dict[str, BoxSession] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._scanner: asyncio.Task[None] | None = None
        self._running = BackgroundTasks("bridge")  # the scanner and every port's session

    async def start(self) -> None:
        if not self.settings.enabled:
            log.info("bridge: switched off ([bridge] enabled = false)")
            return
        await asyncio.to_thread(forget_connections)
        self._scan()
        self._scanner = self._running.start(self._rescan(), name="bridge-scan")
        log.info("bridge: watching %d port(s)%s", len(self._tasks),
                 f", and {self.settings.port_glob} for new boxes" if self.settings.port_glob else "")

    async def stop(self) -> None:
        await self._running.stop(timeout_s=5.0)
        self._tasks.clear()
        self._scanner = None

    def wanted_ports(self) -> list[str]:
        """Configured ports, then globbed ones; one name per device (by-id links resolve)."""
        found = list(self.settings.ports)
        if self.settings.port_glob:
            found += sorted(glob.glob(self.settings.port_glob))
        seen: set[str] = set()
        ports = []
        for port in found:
            real = os.path.realpath(port)
            if real not in seen:
                seen.add(real)
                ports.append(port)
        return ports

    def _scan(self) -> None:
        wanted = self.wanted_ports()
        for port in wanted:
            if port not in self._tasks:
                session = self.sessions.get(port) or BoxSession(
                    port, self.settings, self.spool, self.config.node.name, self.config.node.id, self.on_kept,
                    min_free_mb=self.config.storage.min_free_mb, make_room=self.make_room,
                    limits=DecodeLimits.from_storage(self.config.storage),
                )
                self.sessions[port] = session
                self._tasks[port] = self._running.start(session.run(), name=f"bridge-{port}")
        for port in list(self._tasks):  # a globbed box that went away and is not configured
            if port not in wanted and port not in self.settings.ports:
                self._tasks.pop(port).cancel()

    async def _rescan(self) -> None:
        while True:
            await asyncio.sleep(self.settings.rescan_s)
            self._scan()
