"""The DICOM service: C-ECHO, C-STORE for every storage SOP class pynetdicom knows, worklist C-FIND.

Received datasets are streamed by pynetdicom into a temp file under the data directory
(``STORE_RECV_CHUNKED_DATASET``), never held whole in memory; the C-STORE handler hands
that file to :func:`edge.store.spool.keep_instance` and answers Success only after it
returns. Associations are pynetdicom threads; they write through the store's one-writer
lock and tell the rest of the node through ``on_kept`` (thread-safe callback).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, cast

from pydicom.dataset import Dataset
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    evt,
)
from pynetdicom.dimse_primitives import C_FIND, C_STORE
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.sop_class import ModalityWorklistInformationFind, Verification  # type: ignore[attr-defined]
from pynetdicom.utils import make_target

from edge.dicom import availability, metrics, patches, receive_file, worklist
from edge.dicom.connections import (
    AssociationServer,
    SlotRequestHandler,
    SlotTable,
    slot_of,
)
from edge.dicom.const import (
    ACSE_TIMEOUT_S,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    STATUS_SUCCESS,
    accepted_transfer_syntaxes,
)
from edge.dicom.identifier import read_identifier
from edge.dicom.modalities import ModalityDirectory
from edge.dicom.status import failure_status
from edge.store.db import database
from edge.store.spool import (
    KeptInstance,
    RejectedInstance,
    Spool,
    keep_instance,
)
from edge.store.walk import DecodeLimits

if TYPE_CHECKING:  # the whole config is the roof's; a part only reads it
    from edge.node.config import EdgeConfig

log = logging.getLogger(__name__)

OnKept = Callable[[KeptInstance], None]
# The worklist refuses a peer that is not one of the clinic's modalities with "Unable to process" and a comment:
# a DR shows that failure (0x0124 "Not Authorized" is not in the C-FIND table; findscu prints "Unknown Status").
STATUS_FIND_REFUSED = 0xC000


def _calling(event: Event) -> str:
    return str(event.assoc.requestor.ae_title).strip()


class DicomService:
    """The node's storage SCP; ``start()`` / ``stop()`` pair like every other service."""

    name = "dicom"

    def __init__(
        self,
        config: EdgeConfig,
        spool: Spool,
        on_kept: OnKept | None = None,
        make_room: Callable[[], object] | None = None,
    ) -> None:
        """``make_room``: frees disk by evicting what the cloud already holds (retention), tried before 0xA700."""
        self.config = config
        self.spool = spool
        self.on_kept = on_kept
        self.make_room = make_room
        self._server: AssociationServer | None = None
        self._server_thread: threading.Thread | None = None
        self._accepted: set[int] = set()
        self._lock = threading.Lock()
        self.modalities = ModalityDirectory(config.dicom)  # who may read the worklist (and keep a slot)
        cfg = config.dicom
        self._state_changed = threading.Event()
        self._stopping = threading.Event()
        self.slots = SlotTable(cfg.max_associations, cfg.max_associations_per_host, self.modalities,
                               on_change=self._state_changed.set)

    def _make_ae(self) -> AE:
        cfg = self.config.dicom
        ae = AE(ae_title=cfg.ae_title)
        ae.maximum_pdu_size = cfg.max_pdu_bytes
        # The slots are counted at TCP accept (edge.dicom.slots); pynetdicom's own count
        # also sees threads that are just ending, so its limit is only a backstop.
        ae.maximum_associations = SlotTable.hard_limit_for(cfg.max_associations)
        ae.network_timeout = cfg.network_timeout_s
        # A connection that never completes an association (a port scan, a broken PDU) holds
        # a slot until the ACSE (ARTIM) timer fires, even after the peer has gone: keep it short.
        ae.acse_timeout = self._acse_timeout_s()
        ae.dimse_timeout = cfg.network_timeout_s
        ae.require_called_aet = cfg.require_called_aet
        if cfg.allowed_calling_aets:
            ae.require_calling_aet = list(cfg.allowed_calling_aets)
        ae.add_supported_context(Verification)
        ae.add_supported_context(ModalityWorklistInformationFind)  # the DR reads its worklist here
        transfer_syntaxes = accepted_transfer_syntaxes(list(ALL_TRANSFER_SYNTAXES))
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:  # always set in pynetdicom's list; typed optional
                ae.add_supported_context(context.abstract_syntax, transfer_syntaxes)
        return ae

    def _acse_timeout_s(self) -> float:
        return min(self.config.dicom.network_timeout_s, ACSE_TIMEOUT_S)

    async def start(self) -> None:
        """Listen for associations; the spool's temp dir receives the streamed datasets.

        Installs the node's pynetdicom patches first (edge.dicom.patches): an unknown
        pynetdicom version stops start-up here, with its version in the message.
        """
        patches.install()
        # pynetdicom's temp file goes on the spool's filesystem (``dir=``, not tempfile.tempdir) so
        # the rename into place is atomic (and a power cut leaves it where reconcile looks).
        receive_file.set_temp_dir(self.spool.tmp)
        receive_file.set_max_bytes(DecodeLimits.from_storage(self.config.storage).max_bytes)  # no endless temp file
        cfg = self.config.dicom
        handlers: list[EventHandlerType] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_RELEASED, self._on_ending),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        ae = self._make_ae()
        # What ae.start_server(block=False) does, with our server and request handler.
        server = cast(AssociationServer, ae.make_server(
            (cfg.bind_address, cfg.port),
            evt_handlers=handlers,
            server_class=AssociationServer,
            request_handler=SlotRequestHandler,
        ))
        server.setup_slots(self.slots, first_pdu_s=self._acse_timeout_s(), pdu_s=cfg.network_timeout_s,
                           max_pdu_bytes=cfg.max_pdu_bytes)
        name = f"AcceptorServer@{datetime.now():%Y%m%d%H%M%S}"
        self._server_thread = threading.Thread(target=make_target(server.serve_forever), name=name, daemon=True)
        self._server_thread.start()
        ae._servers.append(server)
        self._server = server
        self._stopping.clear()
        self._write_availability()
        threading.Thread(target=self._keep_availability_written, name="dicom-availability", daemon=True).start()
        log.info("%s listening on %s:%d", cfg.ae_title, cfg.bind_address, cfg.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._stopping.set()
            self._state_changed.set()
            await asyncio.to_thread(self._server.shutdown)
            self._server = None
            availability.remove(self.config.data_dir)
            log.info("stopped")

    def _keep_availability_written(self) -> None:
        """Rewrite the availability file every WRITE_EVERY_S and soon after any slot changes hands."""
        while not self._stopping.is_set():
            self._state_changed.wait(availability.WRITE_EVERY_S)
            self._state_changed.clear()
            if self._stopping.is_set():
                return
            self._write_availability()
            self._stopping.wait(0.2)  # a flood of connections costs at most five writes a second

    def _write_availability(self) -> None:
        counts = self.slots.counts()
        thread = self._server_thread
        state = availability.DicomAvailability(
            pid=os.getpid(), updated_at=time.time(),
            listening=thread is not None and thread.is_alive(),
            slots_used=counts.used, slots_max=counts.max, held_by_strangers=counts.strangers,
            accepting=counts.accepting, modalities_configured=self.modalities.configured,
        )
        try:
            availability.write(self.config.data_dir, state)
        except OSError as exc:
            if not getattr(self, "_availability_failed", False):
                log.error("cannot write %s: %s (health checks will say DICOM is down)",
                          availability.state_path(self.config.data_dir), exc)
            self._availability_failed = True
        else:
            self._availability_failed = False

    def _on_requested(self, event: Event) -> None:
        """The AE title is known now: a modality's address calling with another AE title counts as a stranger."""
        slot = slot_of(event.assoc)
        if slot is None:
            return
        request = event.assoc.requestor.primitive  # the A-ASSOCIATE-RQ: set before EVT_REQUESTED fires
        slot.ae_title = str(request.calling_ae_title if request is not None else "").strip()  # not yet in requestor.ae_title
        if self.slots.confirm(slot, self.modalities.is_modality(slot.ae_title, slot.address)):
            return
        if self._server is not None:
            self._server.refusals.refused(
                slot.peer, f"{slot.ae_title} is no configured modality at this address, and such peers hold "
                "their share of associations (max_associations_per_host, or all but the modalities' one)")
        slot.evicted = True  # logged: no second line when pynetdicom closes it
        self.slots.ending(slot)
        event.assoc.acse.send_reject(0x02, 0x03, 0x02)  # rejected-transient, local-limit-exceeded
        event.assoc.kill()  # as pynetdicom's own rejection does: until the RJ is out and the peer has gone

    def _on_accepted(self, event: Event) -> None:
        with self._lock:
            self._accepted.add(id(event.assoc))
        metrics.ASSOCIATIONS_OPEN.inc()
        assoc = event.assoc
        rejected = sorted({str(cx.abstract_syntax) for cx in assoc.rejected_contexts})
        log.info(
            "association from %s (%s) accepted%s",
            _calling(event),
            assoc.requestor.address,
            f"; {len(rejected)} proposed SOP class(es) not storable here" if rejected else "",
        )
        if rejected:
            log.debug("SOP classes refused for %s: %s", _calling(event), " ".join(rejected))

    def _on_ending(self, event: Event) -> None:
        """Released, aborted or rejected: the DR's next association must not wait for this thread to end."""
        slot = slot_of(event.assoc)
        if slot is not None:
            self.slots.ending(slot)

    def _on_rejected(self, event: Event) -> None:
        self._on_ending(event)
        metrics.ASSOCIATIONS_REJECTED.inc()
        answer = event.assoc.acceptor.primitive
        too_many = answer is not None and answer.result_source == 0x03
        log.warning(
            "association from %s (%s) to %s rejected: %s",
            _calling(event),
            event.assoc.requestor.address,
            str(event.assoc.acceptor.ae_title).strip(),
            "too many associations open" if too_many else "calling AE not allowed or called AE wrong",
        )

    def _on_aborted(self, event: Event) -> None:
        self._on_ending(event)
        slot = slot_of(event.assoc)
        if slot is not None and slot.closed_by_us:
            return  # its line, with the reason, is already in the log
        if event.assoc.dul.idle_timer_expired():
            if slot is not None:
                slot.timed_out = True
            peer = slot.peer if slot is not None else str(event.assoc.requestor.address)
            log.warning("closed the connection from %s (%s): no complete PDU for %.0f s (network_timeout_s)",
                        peer, _calling(event), self.config.dicom.network_timeout_s)
            return
        log.warning("association from %s (%s) aborted", _calling(event), event.assoc.requestor.address)

    def _on_closed(self, event: Event) -> None:
        with self._lock:
            counted = id(event.assoc) in self._accepted
            self._accepted.discard(id(event.assoc))
        if counted:
            metrics.ASSOCIATIONS_OPEN.dec()
        # The association thread is ending: give back its database connection.
        if not database.is_closed():
            database.close()

    def _on_store(self, event: Event) -> int | Dataset:
        """Keep the instance durably, then answer; every failure gets a DICOM status."""
        calling = _calling(event)
        instance_uid = cast(C_STORE, event.request).AffectedSOPInstanceUID
        too_large = receive_file.passed_max_bytes(event.dataset_path)  # asked first: each is asked once
        if receive_file.ran_out_of_space(event.dataset_path):
            metrics.CSTORE_RESULTS.labels("out_of_resources").inc()
            log.error(
                "refused instance %s from %s: the disk filled while it was received",
                instance_uid, calling,
            )
            return failure_status(STATUS_OUT_OF_RESOURCES, "disk full on the edge node")
        if too_large:
            metrics.CSTORE_RESULTS.labels("rejected").inc()
            reason = DecodeLimits.from_storage(self.config.storage).too_large()
            log.warning("refused instance %s from %s: %s, dropped while it was received (status 0x%04X)",
                        instance_uid, calling, reason, STATUS_OUT_OF_RESOURCES)
            return failure_status(STATUS_OUT_OF_RESOURCES, reason)
        if self.spool.free_mb() < self.config.storage.min_free_mb and self.make_room is not None:
            try:
                self.make_room()
            except Exception:
                log.exception("could not free disk space")
        if self.spool.free_mb() < self.config.storage.min_free_mb:
            metrics.CSTORE_RESULTS.labels("out_of_resources").inc()
            log.error(
                "refused instance %s from %s: disk almost full (%.0f MB free, minimum %d MB)",
                instance_uid,
                calling,
                self.spool.free_mb(),
                self.config.storage.min_free_mb,
            )
            return failure_status(STATUS_OUT_OF_RESOURCES, "disk full on the edge node")
        try:
            received_bytes = os.path.getsize(event.dataset_path)
            limits = DecodeLimits.from_storage(self.config.storage)  # size, deflate ratio, element count
            kept = keep_instance(self.spool, event.dataset_path, calling_aet=calling, limits=limits)
        except RejectedInstance as exc:
            metrics.CSTORE_RESULTS.labels("rejected").inc()
            log.warning(
                "refused instance %s from %s: %s (status 0x%04X)",
                instance_uid,
                calling,
                exc.reason,
                exc.status,
            )
            return failure_status(exc.status, exc.reason)
        except Exception:  # a bug must not take the association thread down silently
            metrics.CSTORE_RESULTS.labels("error").inc()
            log.exception("failed to keep instance %s from %s", instance_uid, calling)
            return failure_status(STATUS_PROCESSING_FAILURE, "edge node could not keep the instance")
        metrics.CSTORE_RESULTS.labels("duplicate" if kept.duplicate else "kept").inc()
        if not kept.duplicate:
            metrics.RECEIVED_BYTES.inc(received_bytes)
        if self.on_kept is not None and not kept.duplicate:
            self.on_kept(kept)
        return STATUS_SUCCESS


    def _on_find(self, event: Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        """Modality Worklist C-FIND: for the clinic's modalities only (AE title and address), the window's orders.

        A stranger, or any caller while no modality is configured, gets one refusal whose
        comment the DR can show. The identifier is read strictly (edge.dicom.identifier), not
        through ``event.identifier``. Every query, answered or refused, is one audit row.
        """
        calling, address = _calling(event), str(event.assoc.requestor.address)
        cfg = self.config.dicom
        if not self.modalities.configured:
            yield self._refuse_find(calling, address, STATUS_FIND_REFUSED,
                                    "worklist closed: set [dicom] modality_host", "no modality is configured")
            return
        if not self.modalities.is_modality(calling, address):
            yield self._refuse_find(calling, address, STATUS_FIND_REFUSED,
                                    "worklist: not one of this clinic's modalities",
                                    "AE title and address match no configured modality")
            return
        syntax = event.context.transfer_syntax
        raw = cast(C_FIND, event.request).Identifier

        def read() -> Dataset:
            data = raw.getvalue() if raw is not None else b""
            return read_identifier(data, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)

        sent = 0
        for status, identifier in worklist.answer(read, cancelled=lambda: event.is_cancelled,
                                                  implicit_vr=bool(syntax.is_implicit_VR),
                                                  deflated=bool(syntax.is_deflated),
                                                  days_back=cfg.worklist_days_back, days_ahead=cfg.worklist_days_ahead):
            if identifier is None:
                code = status if isinstance(status, int) else int(status.Status)
                if code == 0xFE00:
                    self._audit_find(calling, address, f"cancelled by the modality after {sent} item(s)")
                else:
                    comment = str(getattr(status, "ErrorComment", ""))
                    log.warning("worklist query from %s (%s) refused (status 0x%04X): %s", calling, address,
                                code, comment)
                    self._audit_find(calling, address, f"refused (0x{code:04X}): {comment}", refused=True)
                yield status, identifier
                return
            sent += 1
            yield status, identifier
        log.info("worklist query from %s answered with %d item(s)", calling, sent)
        self._audit_find(calling, address, f"answered {sent} item(s)")

    def _refuse_find(self, calling: str, address: str, code: int, comment: str,
                     why: str) -> tuple[Dataset, None]:
        log.warning("worklist query from %s (%s) refused (status 0x%04X): %s", calling, address, code, why)
        self._audit_find(calling, address, f"refused (0x{code:04X}): {why}", refused=True)
        return failure_status(code, comment), None

    def _audit_find(self, calling: str, address: str, outcome: str, refused: bool = False) -> None:
        """The console's audit row for a worklist query; a failed write is logged, the DR still answered."""
        try:
            worklist.audit_query(calling, address, outcome, refused=refused)
        except Exception as exc:
            log.error("could not audit the worklist query from %s (%s): %s", calling, address, exc)

