"""Starting and stopping the node's services in one process, in order and in reverse."""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
from collections.abc import Sequence
from typing import TYPE_CHECKING

from peewee import DatabaseError

from edge import sdnotify
from edge.node.config import EdgeConfig
from edge.outbox_bell import BellListener, OutboxBell
from edge.service import Service, ServiceSetupError
from edge.store.db import open_database
from edge.store.reconcile import reconcile
from edge.store.spool import Spool
from edge.store.walk import DecodeLimits

if TYPE_CHECKING:
    from edge.ops.dicom_metrics import DicomMetricsWriter

log = logging.getLogger(__name__)

# Start order; stop is the reverse. `edge run` starts all of them.
# "ops" (heartbeat, zeroconf) goes last: it announces only what already listens.
SERVICE_NAMES: tuple[str, ...] = ("dicom", "sync", "bridge", "kiosk", "console", "ops")


class StartupError(Exception):
    """A service could not start (port in use, data dir unwritable); the message says which."""


def _free_space_hint(config: EdgeConfig) -> str:
    """Most database errors at start-up on the box are a full disk: say how full."""
    try:
        free_mb = shutil.disk_usage(config.data_dir).free / 2**20
    except OSError:
        return ""
    return f" ({free_mb:.0f} MB free on the data disk)"


class _SyncWithBell:
    """The sync service, also woken by the bell: instances kept by another process (``edge run``'s ingest child, the dicom unit)."""

    name = "sync"

    def __init__(self, sync: Service, bell: BellListener) -> None:
        self.sync = sync
        self.bell = bell

    async def start(self) -> None:
        await self.sync.start()
        self.bell.start()

    async def stop(self) -> None:
        self.bell.stop()
        await self.sync.stop()


class _DicomWithMetricsFile:
    """The DICOM service, its counters written for a console in another process (edge.ops.dicom_metrics)."""

    name = "dicom"

    def __init__(self, dicom: Service, writer: DicomMetricsWriter) -> None:
        self.dicom = dicom
        self.writer = writer

    async def start(self) -> None:
        await self.dicom.start()
        await self.writer.start()

    async def stop(self) -> None:
        await self.writer.stop()
        await self.dicom.stop()


def build_services(config: EdgeConfig, names: Sequence[str], node_names: Sequence[str] | None = None) -> list[Service]:
    """Each package is imported only when its service runs: ``edge serve dicom`` stays small.

    ``node_names``: every service of the node, when this process runs only some of them
    (``edge run``'s children): the console's /healthz expects those.
    """
    spool = Spool(config.data_dir)
    storage = config.storage

    def make_room() -> object:
        """Retention on demand: evict what the cloud holds when a C-STORE or an ECG finds the disk short."""
        from sync.retention import enforce_retention

        return enforce_retention(spool, storage.retention_days, storage.high_water_free_mb)

    services: list[Service] = []
    sync_service = None
    if "sync" in names:
        from sync.service import SyncService

        sync_service = SyncService(config, spool)
    # Wake the uploader when something is kept: a call in this process, else the bell to the sync process.
    wake_sync = sync_service.wake if sync_service is not None else OutboxBell(config.data_dir).ring
    for name in SERVICE_NAMES:
        if name not in names:
            continue
        if name == "sync" and sync_service is not None:
            services.append(_SyncWithBell(sync_service, BellListener(config.data_dir, sync_service.wake)))
        elif name == "dicom":
            from edge.dicom.service import DicomService

            report = reconcile(spool, DecodeLimits.from_storage(config.storage))
            log.info(
                "reconcile: %d temp file(s) removed, %d spool file(s) indexed, %d unreadable, %d row(s) without file",
                report.temp_files_removed,
                report.files_indexed,
                report.files_unreadable,
                report.rows_missing_file,
            )
            if "console" in names:
                services.append(DicomService(config, spool, on_kept=lambda kept: wake_sync(), make_room=make_room))
            else:  # the console runs elsewhere: it reads this process's counters from a file
                from edge.ops.dicom_metrics import DicomMetricsWriter

                writer = DicomMetricsWriter(config.data_dir)

                def kept_here(kept: object) -> None:
                    wake_sync()
                    writer.write()

                services.append(_DicomWithMetricsFile(
                    DicomService(config, spool, on_kept=kept_here, make_room=make_room), writer))
        elif name == "bridge":  # ECG boxes; idles when no port is configured or plugged in
            from firmware_bridge.service import BridgeService

            services.append(BridgeService(
                config, spool, on_kept=lambda kept: wake_sync(),
                make_room=make_room,  # as for a C-STORE: evict what the cloud holds before refusing a recording
            ))
        elif name == "kiosk":
            from kiosk.app import KioskService

            services.append(KioskService(config))
        elif name == "console":
            from edge.console.app import ConsoleService

            if "dicom" not in names:
                from edge.ops.dicom_metrics import show_published_dicom_metrics

                show_published_dicom_metrics(config.data_dir)
            services.append(ConsoleService(
                config, services=tuple(n for n in (node_names or names) if n != "console"),
                wake_sync=wake_sync,  # "send now", STAT
            ))
        elif name == "ops":
            from edge.ops.service import OpsService

            services.append(OpsService(config))
    return services


async def run_services(
    config: EdgeConfig, names: Sequence[str], stop: asyncio.Event | None = None, node_names: Sequence[str] | None = None
) -> None:
    """Run until SIGINT/SIGTERM (or ``stop`` is set); stop cleanly in reverse order."""
    try:
        open_database(config.data_dir)
    except OSError as exc:
        raise StartupError(f"cannot open data directory {config.data_dir}: {exc.strerror}") from None
    except DatabaseError as exc:  # a full disk cannot even open SQLite's shared-memory file
        raise StartupError(f"cannot open the database in {config.data_dir}: {exc}{_free_space_hint(config)}") from None
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started: list[Service] = []
    watchdog: asyncio.Task[None] | None = None
    try:
        try:
            services = build_services(config, names, node_names)  # dicom reconciles the spool here: database writes
        except DatabaseError as exc:
            raise StartupError(f"cannot start: database: {exc}{_free_space_hint(config)}") from None
        for service in services:
            try:
                await service.start()
            except OSError as exc:
                raise StartupError(f"{service.name}: cannot start: {exc.strerror or exc}") from None
            except ServiceSetupError as exc:
                raise StartupError(f"{service.name}: cannot start: {exc}") from None
            except DatabaseError as exc:
                raise StartupError(f"{service.name}: cannot start: database: {exc}{_free_space_hint(config)}") from None
            started.append(service)
        log.info("node %s up: %s", config.node.id, ", ".join(s.name for s in started))
        sdnotify.notify("READY=1", f"STATUS=up: {', '.join(s.name for s in started)}")
        watchdog_s = sdnotify.watchdog_interval_s()
        if watchdog_s is not None:
            watchdog = asyncio.create_task(sdnotify.keep_watchdog_fed(watchdog_s), name="watchdog")
        await stop.wait()
        log.info("node %s stopping", config.node.id)
        sdnotify.notify("STOPPING=1")
    finally:
        if watchdog is not None:
            watchdog.cancel()
        for service in reversed(started):
            await service.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
