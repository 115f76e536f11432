"""Starting and stopping the node's services in one process, in order and in reverse."""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
from collections.abc import Sequence

from peewee import DatabaseError

from edge import sdnotify
from edge.node.config import EdgeConfig
from edge.node.parts import SERVICE_NAMES, SERVICES
from edge.outbox_bell import OutboxBell
from edge.part import NodeContext, SyncWake
from edge.service import BackgroundTasks, Service, ServiceSetupError
from edge.store.db import open_database
from edge.store.spool import Spool

log = logging.getLogger(__name__)

__all__ = ["SERVICE_NAMES", "StartupError", "build_services", "run_services"]


class StartupError(Exception):
    """A service could not start (port in use, data dir unwritable); the message says which."""


def _free_space_hint(config: EdgeConfig) -> str:
    """Most database errors at start-up on the box are a full disk: say how full."""
    try:
        free_mb = shutil.disk_usage(config.data_dir).free / 2**20
    except OSError:
        return ""
    return f" ({free_mb:.0f} MB free on the data disk)"


def build_services(config: EdgeConfig, names: Sequence[str], node_names: Sequence[str] | None = None) -> list[Service]:
    """The named services from their parts' factories, in start order; nothing starts yet.

    ``node_names``: every service of the node, when this process runs only some of them
    (``edge run``'s children): the console's /healthz expects those. Each factory imports its
    package only when its service runs here: ``edge serve dicom`` stays small.
    """
    spool = Spool(config.data_dir)
    storage = config.storage
    here = tuple(name for name in SERVICE_NAMES if name in names)

    def make_room() -> object:
        """Retention on demand: evict what the cloud holds when a C-STORE or an ECG finds the disk short."""
        from sync.retention import enforce_retention

        return enforce_retention(spool, storage.retention_days, storage.high_water_free_mb)

    # Wake the uploader when something is kept: the sync service here takes the call (its
    # factory attaches itself), else the bell rings the sync process.
    wake_sync = SyncWake(None if "sync" in here else OutboxBell(config.data_dir).ring)
    context = NodeContext(config=config, spool=spool, here=here, node=tuple(node_names or here),
                          wake_sync=wake_sync, make_room=make_room)
    return [factory.build(context) for factory in SERVICES if factory.name in here]


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
    watchdog = BackgroundTasks("node")
    try:
        services = build_services(config, names, node_names)
        for service in services:  # dicom reconciles the spool with the database first (edge.dicom.part)
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
            watchdog.start(sdnotify.keep_watchdog_fed(watchdog_s), name="watchdog")
        await stop.wait()
        log.info("node %s stopping", config.node.id)
        sdnotify.notify("STOPPING=1")
    finally:
        await watchdog.stop()
        for service in reversed(started):
            await service.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
