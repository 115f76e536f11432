"""The sync part: [cloud], [sync], [reports], the report tables, the cloud doctor item and ``edge serve sync``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge.outbox_bell import BellListener
from edge.part import NodeContext, Part, ServiceFactory
from edge.service import Service
from edge.store.migrations import Schema
from sync import tables
from sync.config import CloudSection, ReportsSection, SyncSection
from sync.doctor import check_cloud

if TYPE_CHECKING:
    from sync.service import SyncService


class SyncWithBell:
    """The sync service, also woken by the bell: instances kept by another process (``edge run``'s
    ingest child, the dicom unit) ring it."""

    name = "sync"

    def __init__(self, sync: SyncService, bell: BellListener) -> None:
        self.sync = sync
        self.bell = bell

    async def start(self) -> None:
        await self.sync.start()
        self.bell.start()

    async def stop(self) -> None:
        self.bell.stop()
        await self.sync.stop()


def build_sync(context: NodeContext) -> Service:
    """Whatever is kept in this process now wakes this service directly, not through the bell."""
    from sync.service import SyncService

    service = SyncService(context.config, context.spool)
    context.wake_sync.attach(service.wake)
    return SyncWithBell(service, BellListener(context.config.data_dir, service.wake))


PART = Part(
    name="sync",
    after=("store",),
    sections={"cloud": CloudSection, "sync": SyncSection, "reports": ReportsSection},
    schema=Schema("sync", tuple(tables.SYNC_TABLES), tables.MIGRATIONS),
    doctor_checks=(check_cloud,),
    services=(ServiceFactory("sync", build_sync),),
)
