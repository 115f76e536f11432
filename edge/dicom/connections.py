"""Who holds the node's DICOM association slots, and how long anyone may take to send a PDU.

The clinic LAN is shared, so a stranger must not be able to hold the DR out:

- A slot is taken at TCP accept (``SlotTable.admit``), before pynetdicom spends a thread or
  reads a byte, and given back when the association's thread ends.
- A stranger (an address that is no configured modality's) gets at most
  ``max_associations_per_host`` slots per address, and never the last free slot while a
  modality is configured; a modality that finds every slot taken closes the stranger that
  has gone longest without a complete PDU (a stalled one first).
- Every PDU must arrive whole within its deadline (``PduReader``): the first (the
  A-ASSOCIATE-RQ) within the ACSE timeout of the connection, every later one within
  ``network_timeout_s`` of its first byte. pynetdicom's own timer (``network_timeout_s``
  from the last complete PDU) asks for an abort in time, but its read blocked forever on a
  PDU that stopped half-way, so the abort never came and the slot was never freed.
- A refused stranger gets an A-ASSOCIATE-RJ (transient, local limit exceeded) and a close;
  refusals are logged at most once per ``REFUSAL_LOG_EVERY_S``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from edge.dicom.modalities import ModalityDirectory

log = logging.getLogger(__name__)

# A stranger is closed for a modality only when it has sent no complete PDU for this long:
# one streaming images sends several PDUs a second.
EVICT_IDLE_S = 5.0
REFUSAL_LOG_EVERY_S = 10.0
# A-ASSOCIATE-RJ: rejected-transient (2), DUL service-provider presentation related (3), local-limit-exceeded (2).
_ASSOCIATE_RJ_LOCAL_LIMIT = struct.pack(">BBIBBBB", 0x03, 0x00, 4, 0x00, 0x02, 0x03, 0x02)
_PDU_TYPES = range(0x01, 0x08)


@dataclass(eq=False)
class Slot:
    """One accepted connection: from where, and how recently it completed a PDU."""

    address: str
    port: int
    stranger: bool
    sock: socket.socket
    opened_at: float = field(default_factory=time.monotonic)
    last_pdu_at: float = 0.0
    evicted: bool = False  # closed to make room for a modality
    timed_out: bool = False  # closed because a PDU missed its deadline
    gone: bool = False  # the connection is over (closed, reset or cut short)
    ending: bool = False  # released, aborted or rejected: closing, its thread about to end
    ae_title: str = ""

    def __post_init__(self) -> None:
        self.last_pdu_at = self.opened_at

    @property
    def peer(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def live(self) -> bool:
        """Counts against the limits. A connection that is over or closing does not, though its
        thread may take a moment to end: the DR's next association must not wait for that."""
        return not (self.evicted or self.gone or self.ending)

    @property
    def closed_by_us(self) -> bool:
        """Already logged with its reason: pynetdicom's abort that follows needs no line of its own."""
        return self.evicted or self.timed_out


@dataclass(frozen=True)
class SlotCounts:
    used: int
    max: int
    strangers: int
    accepting: bool  # a configured modality (with none configured: any peer) would get a slot now


class SlotTable:
    """The node's association slots; ``admit`` runs in the accept thread, the rest in association threads."""

    def __init__(self, max_total: int, per_host: int, directory: ModalityDirectory,
                 on_change: Callable[[], None] | None = None) -> None:
        self.max_total = max_total
        self.per_host = per_host
        self.directory = directory
        self.on_change = on_change
        self._slots: set[Slot] = set()
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        # Every connection with a thread, live or ending; pynetdicom refuses past its own
        # maximum_associations, which the service sets to this.
        self.hard_limit = self.hard_limit_for(max_total)

    @staticmethod
    def hard_limit_for(max_total: int) -> int:
        return 2 * max_total + 2

    @property
    def _kept_for_modalities(self) -> int:
        return 1 if self.directory.configured and self.max_total > 1 else 0

    def admit(self, sock: socket.socket, address: str, port: int) -> Slot | str:
        """A slot for this connection, or why not (in the clinic's words, for the log)."""
        stranger = not self.directory.is_modality_address(address)
        with self._lock:
            live = [s for s in self._slots if s.live]
            if len(self._slots) >= self.hard_limit:  # threads still ending: pynetdicom's own limit
                return f"{len(self._slots)} connections still closing"
            if stranger:
                # One more than the share while the request has not arrived: the peer's last
                # connection may be closing this very moment. confirm() holds it to the share.
                if sum(1 for s in live if s.address == address) >= self.per_host + 1:
                    return f"{self.per_host} association(s) already open from this address (max_associations_per_host)"
                if len(live) >= self.max_total:
                    return f"all {self.max_total} associations in use"
                if sum(1 for s in live if s.stranger) >= self.max_total - self._kept_for_modalities:
                    return "the last free association is kept for the clinic's modalities"
            elif len(live) >= self.max_total:
                victim = self._idlest_stranger(live)
                if victim is None:
                    return f"all {self.max_total} associations in use by the clinic's modalities or busy peers"
                self._evict(victim, address)
            slot = Slot(address, port, stranger, sock)
            self._slots.add(slot)
        self._changed()
        return slot

    def confirm(self, slot: Slot, is_modality: bool, wait_s: float = 1.0) -> bool:
        """When the A-ASSOCIATE-RQ has arrived (AE title known): may it have its association?

        A modality's address calling with another AE title is a stranger. A stranger over its
        share waits up to ``wait_s`` (in its own thread) for one of its earlier connections
        to finish closing; False: refuse it.
        """
        if not slot.stranger and is_modality:
            return True
        deadline = time.monotonic() + wait_s
        with self._freed:
            slot.stranger = True
            while True:
                others = [s for s in self._slots if s.live and s is not slot and s.stranger]
                if (sum(1 for s in others if s.address == slot.address) < self.per_host
                        and len(others) < self.max_total - self._kept_for_modalities):
                    fits = True
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    fits = False
                    break
                self._freed.wait(remaining)
        self._changed()
        return fits

    def release(self, slot: Slot) -> None:
        """Give the slot back when the association's thread ends (again is harmless)."""
        with self._freed:
            if slot not in self._slots:
                return
            self._slots.discard(slot)
            self._freed.notify_all()
        self._changed()

    def ending(self, slot: Slot) -> None:
        """The association is over (released, aborted, rejected, connection closed): it no longer counts."""
        with self._freed:
            slot.ending = True
            self._freed.notify_all()
        self._changed()

    def counts(self) -> SlotCounts:
        with self._lock:
            live = [s for s in self._slots if s.live]
            strangers = sum(1 for s in live if s.stranger)
            accepting = len(live) < self.max_total or (
                self.directory.configured and self._idlest_stranger(live) is not None
            )
        return SlotCounts(len(live), self.max_total, strangers, accepting)

    def _idlest_stranger(self, live: list[Slot]) -> Slot | None:
        now = time.monotonic()
        idle = [s for s in live if s.stranger and now - s.last_pdu_at >= EVICT_IDLE_S]
        return min(idle, key=lambda s: s.last_pdu_at, default=None)

    def _evict(self, victim: Slot, for_address: str) -> None:
        victim.evicted = True
        log.warning("dicom: closed the connection from %s (idle %.0f s) to make room for the modality at %s",
                    victim.peer, time.monotonic() - victim.last_pdu_at, for_address)
        with contextlib.suppress(OSError):  # its association thread sees the close and gives the slot back
            victim.sock.shutdown(socket.SHUT_RDWR)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


class RefusalLog:
    """One line per refused connection would let a stranger fill the log: at most one per interval."""

    def __init__(self, every_s: float = REFUSAL_LOG_EVERY_S) -> None:
        self.every_s = every_s
        self._last = float("-inf")
        self._quiet = 0
        self._lock = threading.Lock()

    def refused(self, peer: str, reason: str) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.every_s:
                self._quiet += 1
                return
            quiet, self._quiet, self._last = self._quiet, 0, now
        more = f" ({quiet} more refused in the last {self.every_s:.0f} s)" if quiet else ""
        log.warning("dicom: refused a connection from %s: %s%s", peer, reason, more)


# --- reading PDUs ---------------------------------------------------------------------

# A PDU's length comes from the peer: buffer at most this much ahead of the bytes that have
# actually arrived, so a broken or hostile length field (up to 4 GiB) costs no memory.
_RECV_GROW_BYTES = 1 << 20
_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)
# Set in a DUL thread whose read we cut short: pynetdicom's own complaint about the short
# PDU that follows says nothing our line did not (see _QuietAfterOurClose).
_cut_short = threading.local()


class PduReader:
    """``AssociationSocket.recv``: reads in bulk, and each PDU must arrive whole within its deadline.

    pynetdicom reads a PDU as ``recv(6)`` (the header) then ``recv(length)``; the reader
    tells the two apart by the header it just read, so one deadline covers both. Past it, or
    when the peer closes, it returns what it has: pynetdicom treats a short PDU as the
    connection closing, ends the association and frees its slot.

    It asks for everything still missing on each call (pynetdicom's own asks 4 KiB at a
    time: ~35 calls per 128 KiB PDU), and ACKs at once (TCP_QUICKACK): DCMTK sends a PDU
    header and body as two small writes with Nagle on, and a delayed ACK held the body ~40 ms.
    """

    def __init__(self, assoc_sock: AssociationSocket, slot: Slot, first_pdu_s: float, pdu_s: float,
                 on_closed: Callable[[Slot], None]) -> None:
        self.sock = cast(socket.socket, assoc_sock.socket)
        self.slot = slot
        self.on_closed = on_closed
        self.pdu_s = pdu_s
        self.first_pdu_s = first_pdu_s
        self._deadline = slot.opened_at + first_pdu_s
        self._first = True
        self._body_expected: int | None = None
        # Sends block at most this long too (a peer that stops reading our answers).
        self.sock.settimeout(pdu_s)

    def __call__(self, nr_bytes: int) -> bytearray:
        if self._body_expected is not None and nr_bytes == self._body_expected:
            self._body_expected = None
            header = False
        else:  # a new PDU starts with its header
            header = True
            if not self._first:
                self._deadline = time.monotonic() + self.pdu_s
        data = self._read(nr_bytes)
        if len(data) == nr_bytes:
            if header and nr_bytes == 6:
                pdu_type, _, length = struct.unpack(">BBL", data)
                if pdu_type in _PDU_TYPES:
                    self._body_expected = length
            if not header:
                self._first = False
                self.slot.last_pdu_at = time.monotonic()
        else:
            _cut_short.active = self.slot.closed_by_us
            # The connection is over: its slot counts no more, even before pynetdicom's thread
            # has wound down (a peer that closes before associating kept it for the ACSE timeout).
            self.slot.gone = True
            self.on_closed(self.slot)
        return data

    def _read(self, nr_bytes: int) -> bytearray:
        """Until ``nr_bytes`` arrived, the peer closed, or the deadline passed; returns what it has."""
        sock = self.sock
        buffer = bytearray(min(nr_bytes, _RECV_GROW_BYTES))
        nr_read = 0
        try:
            while nr_read < nr_bytes:
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    self._missed_deadline(nr_read, nr_bytes)
                    break
                if nr_read == len(buffer):
                    buffer.extend(bytes(min(nr_bytes - nr_read, _RECV_GROW_BYTES)))
                _ack_at_once(sock)
                sock.settimeout(remaining)
                with memoryview(buffer) as view:
                    got = sock.recv_into(view[nr_read:])
                if not got:
                    break
                nr_read += got
        except TimeoutError:
            self._missed_deadline(nr_read, nr_bytes)
        except OSError:  # reset by the peer, or closed under us (evicted): as good as closed
            pass
        else:
            with contextlib.suppress(OSError):
                sock.settimeout(self.pdu_s)
        del buffer[nr_read:]
        return buffer

    def _missed_deadline(self, nr_read: int, nr_bytes: int) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        if self.slot.closed_by_us:  # pynetdicom's idle timer got there first, and it is logged
            return
        self.slot.timed_out = True
        what = (f"its association request did not arrive within {self.first_pdu_s:.0f} s of connecting"
                if self._first else f"a PDU did not arrive whole within {self.pdu_s:.0f} s")
        log.warning("dicom: closed the connection from %s%s: %s (%d of %d bytes of this read)",
                    self.slot.peer, f" ({self.slot.ae_title})" if self.slot.ae_title else "", what, nr_read, nr_bytes)


def _ack_at_once(sock: socket.socket) -> None:
    """Acknowledge what arrives without the kernel's delayed ACK (Linux; re-armed before every read)."""
    if _TCP_QUICKACK is not None:
        with contextlib.suppress(OSError):  # not TCP, or the peer is gone: the read will tell
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)


class _QuietAfterOurClose(logging.Filter):
    """Drop pynetdicom's lines about a connection we close and log ourselves, with its peer address."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("The received PDU is shorter than expected"):
            return not getattr(_cut_short, "active", False)
        return message != "Network timeout reached"  # DicomService._on_aborted says it, with the peer


logging.getLogger("pynetdicom.dul").addFilter(_QuietAfterOurClose())
logging.getLogger("pynetdicom.association").addFilter(_QuietAfterOurClose())


# --- the server -----------------------------------------------------------------------


def slot_of(assoc: Any) -> Slot | None:
    """The slot an association holds (None for associations this node requested)."""
    return cast(Slot | None, getattr(assoc, "_edge_slot", None))


class AssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, deciding at TCP accept who gets a slot."""

    slots: SlotTable
    refusals: RefusalLog
    first_pdu_s: float
    pdu_s: float

    def setup_slots(self, slots: SlotTable, first_pdu_s: float, pdu_s: float) -> None:
        self.slots, self.refusals = slots, RefusalLog()
        self.first_pdu_s, self.pdu_s = first_pdu_s, pdu_s
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
                sock.send(_ASSOCIATE_RJ_LOCAL_LIMIT)
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
        sock.recv = PduReader(sock, slot, server.first_pdu_s, server.pdu_s, server.slots.ending)  # type: ignore[method-assign]
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
            try:
                run()
            finally:
                server.slots.release(slot)

        assoc.run = run_then_free_the_slot  # type: ignore[method-assign]
        _stop_waiting_when_gone(assoc, slot)
        return assoc


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
