"""The DICOM part: [dicom], its doctor items, and ``edge serve dicom`` (C-STORE, worklist, C-ECHO).

The service imports pynetdicom only when built, so this declaration stays light.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from edge.config.sections import DicomSection
from edge.dicom.doctor import check_calling_aets, check_dr, check_worklist
from edge.part import NodeContext, Part, ServiceFactory
from edge.service import Service

if TYPE_CHECKING:
    from edge.dicom.published_metrics import DicomMetricsWriter

log = logging.getLogger(__name__)


class NodeDicom:
    """The DICOM service as the node runs it: the spool reconciled with the database first (a
    power cut may have left temp files or rows without files), then the listener; and, when the
    console runs in another process, its counters written to a file for that console."""

    name = "dicom"

    def __init__(self, dicom: Service, context: NodeContext, writer: DicomMetricsWriter | None) -> None:
        self.dicom = dicom
        self.context = context
        self.writer = writer

    async def start(self) -> None:
        await asyncio.to_thread(self._reconcile)
        await self.dicom.start()
        if self.writer is not None:
            await self.writer.start()

    def _reconcile(self) -> None:
        from edge.store.reconcile import reconcile
        from edge.store.walk import DecodeLimits

        report = reconcile(self.context.spool, DecodeLimits.from_storage(self.context.config.storage))
        log.info(
            "reconcile: %d temp file(s) removed, %d spool file(s) indexed, %d unreadable, %d row(s) without file",
            report.temp_files_removed,
            report.files_indexed,
            report.files_unreadable,
            report.rows_missing_file,
        )

    async def stop(self) -> None:
        if self.writer is not None:
            await self.writer.stop()
        await self.dicom.stop()


def build_dicom(context: NodeContext) -> Service:
    """Every kept instance wakes the uploader; without a console here, also rewrites the counters file."""
    from edge.dicom.service import DicomService

    config, wake_sync = context.config, context.wake_sync
    if "console" in context.here:
        service = DicomService(config, context.spool, on_kept=lambda kept: wake_sync(), make_room=context.make_room)
        return NodeDicom(service, context, writer=None)
    from edge.dicom.published_metrics import DicomMetricsWriter

    writer = DicomMetricsWriter(config.data_dir)

    def kept_here(kept: object) -> None:
        wake_sync()
        writer.write()

    return NodeDicom(DicomService(config, context.spool, on_kept=kept_here, make_room=context.make_room), context, writer)


PART = Part(
    name="dicom",
    after=("store", "orders"),
    sections={"dicom": DicomSection},
    doctor_checks=(check_dr, check_worklist, check_calling_aets),
    services=(ServiceFactory("dicom", build_dicom),),
)
