"""The node's DICOM server: who gets a slot at TCP accept, and an association that breaks ends cleanly.

- A slot is taken at TCP accept (``AssociationServer.verify_request``, from the
  ``SlotTable`` of edge.dicom.slots), before pynetdicom spends a thread or reads a byte,
  and given back when the association's thread ends (``SlotRequestHandler``). Each
  association reads through a ``PduReader`` (edge.dicom.pdu_reader) and its threads' log
  lines are budgeted (edge.dicom.peer_log).
- A peer's bytes can drive pynetdicom into an exception its threads do not catch (an event
  its state machine has no transition for, an A-ASSOCIATE-RQ it decodes but cannot turn into
  a request, a presentation context without a transfer syntax). Either thread of an
  association (DUL reactor or association) that raises ends it here (``_end_broken``): an
  A-ASSOCIATE-RJ while negotiating, else an A-ABORT, the connection closed, the slot given
  back, one warning line with the peer's address and no traceback.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from edge.dicom.assembly import AssemblyLimitPassed
from edge.dicom.pdu_reader import ABORT, ASSOCIATE_RJ_BROKEN, ASSOCIATE_RJ_LOCAL_LIMIT, PduReader
from edge.dicom.peer_log import say_left_out, serve_connection, short_exception
from edge.dicom.slots import RefusalLog, Slot, SlotTable

log = logging.getLogger(__name__)


def slot_of(assoc: Any) -> Slot | None:
    """The slot an association holds (None for associations this node requested)."""
    return cast(Slot | None, getattr(assoc, "_edge_slot", None))


class AssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, deciding at TCP accept who gets a slot."""

    slots: SlotTable
    refusals: RefusalLog
    first_pdu_s: float
    pdu_s: float

    def setup_slots(self, slots: SlotTable, first_pdu_s: float, pdu_s: float, max_pdu_bytes: int = 0) -> None:
        self.slots, self.refusals = slots, RefusalLog()
        self.first_pdu_s, self.pdu_s = first_pdu_s, pdu_s
        self.max_pdu_bytes = max_pdu_bytes
        self._pending: dict[int, Slot] = {}
        self._pending_lock = threading.Lock()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """In the accept thread, before any thread is started: a slot, or an A-ASSOCIATE-RJ and a close."""
        sock = cast(socket.socket, request)
        address, port = str(client_address[0]), int(client_address[1])
        slot = self.slots.admit(sock, address, port)
        if isinstance(slot, str):
            self.refusals.refused(f"{address}:{port}", slot)
            with contextlib.suppress(OSError):  # never wait on a peer here: this thread accepts everyone
                sock.setblocking(False)
                sock.send(ASSOCIATE_RJ_LOCAL_LIMIT)
            return False  # socketserver closes it
        with self._pending_lock:
            self._pending[id(sock)] = slot
        return True

    def take_slot(self, request: Any) -> Slot | None:
        with self._pending_lock:
            return self._pending.pop(id(request), None)

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread for it (socketserver closes the connection)
            slot = self.take_slot(request)
            if slot is not None:
                self.slots.release(slot)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            slot = self.take_slot(request)  # still here: no association took it over
            if slot is not None:
                self.slots.release(slot)


class SlotRequestHandler(RequestHandler):
    """pynetdicom's handler: the association reads through a PduReader and gives its slot back when it ends."""

    server: AssociationServer

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        server = self.server
        slot = server.take_slot(self.request)
        sock = assoc.dul.socket
        if slot is None or sock is None:
            return assoc
        assoc._edge_slot = slot  # type: ignore[attr-defined]
        sock.recv = PduReader(sock, slot, server.first_pdu_s, server.pdu_s, server.slots.ending,  # type: ignore[method-assign]
                              server.max_pdu_bytes)
        with contextlib.suppress(OSError):  # our answers go out as written, not held for an ACK
            cast(socket.socket, sock.socket).setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        state_machine = assoc.dul.state_machine
        transition = state_machine.transition

        def transition_and_stop_counting(state: str) -> None:
            transition(state)
            if state == "Sta1":  # idle again: whichever way it ended (close, reset, abort), the connection is over
                slot.gone = True
                server.slots.ending(slot)

        state_machine.transition = transition_and_stop_counting  # type: ignore[method-assign]
        run = assoc.run

        def run_then_free_the_slot() -> None:
            serve_connection(slot)
            try:
                run()
            except Exception as exc:  # a peer's bytes pynetdicom's negotiation or reactor did not expect
                _end_broken(assoc, slot, server.slots, exc, "association")
            finally:
                server.slots.release(slot)
                say_left_out()

        assoc.run = run_then_free_the_slot  # type: ignore[method-assign]
        dul = assoc.dul
        dul_run = dul.run

        def dul_run_or_end() -> None:
            serve_connection(slot)
            try:
                dul_run()
            except Exception as exc:  # the reactor died: without this the association waits on a dead DUL
                _end_broken(assoc, slot, server.slots, exc, "DUL")
            finally:
                say_left_out()

        dul.run = dul_run_or_end  # type: ignore[method-assign]
        _stop_waiting_when_gone(assoc, slot)
        return assoc


def _end_broken(assoc: Association, slot: Slot, slots: SlotTable, exc: Exception, thread: str) -> None:
    """One of the association's threads raised: answer the peer, close, stop both threads, one line.

    Runs in the thread that raised. While the request is being negotiated (Sta2: the DUL
    could not turn the A-ASSOCIATE-RQ into a request; Sta3: the acceptor could not negotiate
    it) the peer gets an A-ASSOCIATE-RJ, later an A-ABORT; in Sta13 pynetdicom has already
    answered and only the close was left to do.
    """
    already = slot.broken
    slot.broken = True  # pynetdicom's own abort line, if any follows, is not needed
    slot.gone = True  # the other thread, if waiting for the A-ASSOCIATE-RQ, stops waiting
    dul = assoc.dul
    state = dul.state_machine.current_state
    negotiating = state in ("Sta2", "Sta3")
    if not already:
        what = ("refused the association request from %s%s (A-ASSOCIATE-RJ)" if negotiating
                else "closed the connection from %s%s, already aborted" if state == "Sta13"
                else "aborted the association from %s%s")
        ae_title = f" ({slot.ae_title})" if slot.ae_title else ""
        if isinstance(exc, AssemblyLimitPassed):  # the node's own limit, not pynetdicom's surprise
            log.warning(what + ": %s", slot.peer, ae_title, exc)
        else:
            log.warning(what + ": pynetdicom's %s thread could not go on with what it sent (%s)",
                        slot.peer, ae_title, thread, short_exception(exc))
    assoc_sock = dul.socket
    raw = cast(socket.socket | None, getattr(assoc_sock, "socket", None))
    if raw is not None and state != "Sta13":
        with contextlib.suppress(OSError):
            raw.settimeout(1.0)  # a peer that does not read gets no answer, and no more of our time
            raw.sendall(ASSOCIATE_RJ_BROKEN if negotiating else ABORT)
    if negotiating:
        assoc.is_rejected = True
    else:
        assoc.is_aborted = True
    assoc.is_established = False
    assoc._kill = True  # type: ignore[attr-defined]  # the association reactor's loop condition
    dul.kill_dul()
    was_open = raw is not None
    if assoc_sock is not None:
        with contextlib.suppress(Exception):  # shut down and closed; pynetdicom's own close is a no-op after it
            assoc_sock.close()
    with contextlib.suppress(Exception):
        dul.state_machine.transition("Sta1")  # counts no more (transition_and_stop_counting)
    slots.ending(slot)
    if was_open:
        with contextlib.suppress(Exception):  # the service's counters and database connection, as after any close
            evt.trigger(assoc, evt.EVT_CONN_CLOSE, {"address": (slot.address, slot.port)})



def _stop_waiting_when_gone(assoc: Association, slot: Slot) -> None:
    """The association thread waits up to the ACSE timeout for the A-ASSOCIATE-RQ, even after the
    peer has closed: end that wait when the connection is over, so a peer that connects and
    hangs up in a loop leaves no pile of waiting threads behind (pynetdicom counts them all)."""
    dul = assoc.dul
    receive_pdu = dul.receive_pdu

    def first_receive(wait: bool = False, timeout: float | None = None) -> Any:
        dul.receive_pdu = receive_pdu  # type: ignore[method-assign]  # only the first wait
        if not wait or timeout is None:
            return receive_pdu(wait, timeout)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            primitive = receive_pdu(wait=True, timeout=max(0.0, min(0.1, remaining)))
            if primitive is not None or slot.gone or remaining <= 0:
                return primitive

    dul.receive_pdu = first_receive  # type: ignore[method-assign]
