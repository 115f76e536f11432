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
- A peer's bytes can drive pynetdicom into an exception its threads do not catch (an event
  its state machine has no transition for, an A-ASSOCIATE-RQ it decodes but cannot turn into
  a request, a presentation context without a transfer syntax). Either thread of an
  association (DUL reactor or association) that raises ends it here (``_end_broken``): an
  A-ASSOCIATE-RJ while negotiating, else an A-ABORT, the connection closed, the slot given
  back, one warning line with the peer's address and no traceback.
- No PDU may be longer than the node can afford to hold: a P-DATA-TF no longer than the
  ``max_pdu_bytes`` we announced (and some slack), any other PDU ``OTHER_PDU_MAX_BYTES``.
  A longer one is refused from its header (A-ABORT or A-ASSOCIATE-RJ, a close, one line):
  the reader used to buffer whatever length the peer wrote, and one 200 MB P-DATA-TF took
  the node from 75 to 875 MB while pynetdicom decoded it.
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

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from edge.dicom.assembly import AssemblyLimitPassed
from edge.dicom.modalities import ModalityDirectory
from edge.ops.terminal import printable

log = logging.getLogger(__name__)

# A stranger is closed for a modality only when it has sent no complete PDU for this long:
# one streaming images sends several PDUs a second.
EVICT_IDLE_S = 5.0
REFUSAL_LOG_EVERY_S = 10.0
# A-ASSOCIATE-RJ: rejected-transient (2), DUL service-provider presentation related (3), local-limit-exceeded (2).
_ASSOCIATE_RJ_LOCAL_LIMIT = struct.pack(">BBIBBBB", 0x03, 0x00, 4, 0x00, 0x02, 0x03, 0x02)
# A-ASSOCIATE-RJ: rejected-permanent (1), DUL service-user (1), no-reason-given (1): a request pynetdicom cannot negotiate.
_ASSOCIATE_RJ_BROKEN = struct.pack(">BBIBBBB", 0x03, 0x00, 4, 0x00, 0x01, 0x01, 0x01)
# A-ABORT: source DUL service-provider (2), reason not specified (0).
_ABORT = struct.pack(">BBIBBBB", 0x07, 0x00, 4, 0x00, 0x00, 0x02, 0x00)
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
    broken: bool = False  # a pynetdicom thread raised on the peer's bytes: ended by _end_broken
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
        return self.evicted or self.timed_out or self.broken


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
# A P-DATA-TF may be this much longer than the max_pdu_bytes we announced (a peer counting
# the header or the PDV lengths in, or off by a few bytes), and with max_pdu_bytes 0 ("no
# limit") as long as the largest max_pdu_bytes the config allows.
PDATA_SLACK_BYTES = 64 * 1024
PDATA_UNLIMITED_BYTES = 16 * 1024 * 1024
# Any other PDU: an A-ASSOCIATE-RQ with every storage SOP class in every transfer syntax is
# well under 64 KiB; A-RELEASE and A-ABORT are 4 bytes.
OTHER_PDU_MAX_BYTES = 1024 * 1024
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
                 on_closed: Callable[[Slot], None], max_pdu_bytes: int = 0) -> None:
        self.sock = cast(socket.socket, assoc_sock.socket)
        self.max_pdata_bytes = (max_pdu_bytes or PDATA_UNLIMITED_BYTES) + PDATA_SLACK_BYTES
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
                    if length > (self.max_pdata_bytes if pdu_type == 0x04 else OTHER_PDU_MAX_BYTES):
                        self._refuse_too_long(pdu_type, length)
                        del data[:]  # pynetdicom reads a short header as the connection closing
                        return data
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

    def _refuse_too_long(self, pdu_type: int, length: int) -> None:
        """A PDU longer than we would hold: answer (RJ while negotiating, else A-ABORT), close, one line."""
        already = self.slot.closed_by_us
        self.slot.broken = True  # pynetdicom's own lines about the close are not needed
        _cut_short.active = True
        if not already:
            limit = self.max_pdata_bytes if pdu_type == 0x04 else OTHER_PDU_MAX_BYTES
            log.warning("dicom: %s the connection from %s%s: a PDU (type 0x%02X) of %d bytes, longer than the %d "
                        "the node accepts (max_pdu_bytes)", "refused" if self._first else "aborted",
                        self.slot.peer, f" ({self.slot.ae_title})" if self.slot.ae_title else "", pdu_type, length,
                        limit)
        with contextlib.suppress(OSError):
            self.sock.settimeout(1.0)  # a peer that does not read gets no more of our time
            self.sock.sendall(_ASSOCIATE_RJ_BROKEN if self._first else _ABORT)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.slot.gone = True
        self.on_closed(self.slot)

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


# The association a thread serves, for log lines pynetdicom writes without the peer's address.
_thread_slot = threading.local()
# pynetdicom's line before the traceback it logs for a PDU it could not read; our one line says it.
_BEFORE_TRACEBACK = {
    "Unable to decode the received PDU data": "a PDU that could not be decoded",
    "Connection closed before the entire PDU was received": "a PDU cut short",
}
_LONGEST_DETAIL = 200
LINES_PER_CONNECTION = 10  # from pynetdicom and pydicom, per connection thread; more are counted, not written


def short_exception(exc: BaseException | None) -> str:
    """``Type: text`` on one line, bounded: the peer chooses what goes into the text."""
    if exc is None:
        return "?"
    text = printable(" ".join(str(exc).split()))
    text = text if len(text) <= _LONGEST_DETAIL else text[:_LONGEST_DETAIL] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _thread_peer() -> str:
    slot = cast(Slot | None, getattr(_thread_slot, "slot", None))
    return slot.peer if slot is not None else "a peer"


def _as_warning(record: logging.LogRecord, msg: str, *args: object) -> None:
    record.msg, record.args = msg, args
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    record.levelno, record.levelname = logging.WARNING, "WARNING"


class _OneLineForUndecodable(logging.Filter):
    """pynetdicom logs a full traceback for every PDU it cannot decode (and then aborts, which is
    right): a stranger sending garbage in a loop would fill the SD card. One warning line
    instead, with the peer's address; the line pynetdicom writes before it is folded in. After
    a PDU of unknown type pynetdicom reads the rest of the stream six bytes at a time, each an
    "unknown PDU type" line: the first is said, the rest of that connection's are not."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info is None:
            if not isinstance(record.msg, str):
                return True
            if record.msg.startswith("Unknown PDU type received"):
                if getattr(_thread_slot, "unknown_type_said", False):
                    return False
                _thread_slot.unknown_type_said = True
                _as_warning(record, "dicom: %s from %s: pynetdicom aborts the association",
                            record.msg.replace("Unknown PDU type received", "a PDU of unknown type"), _thread_peer())
                return True
            what = _BEFORE_TRACEBACK.get(record.msg)
            if what is None:
                return True
            _thread_slot.pending = what
            return False
        what = getattr(_thread_slot, "pending", None) or "a value that could not be decoded"
        _thread_slot.pending = None
        _as_warning(record, "dicom: %s from %s (%s): pynetdicom ends the association",
                    what, _thread_peer(), short_exception(record.exc_info[1]))
        return True


class _LinesPerConnection(logging.Filter):
    """At most ``LINES_PER_CONNECTION`` lines from pynetdicom and pydicom per connection thread
    (a PDU can carry hundreds of bad UIDs, each a warning); the rest are counted and said in
    one line when the thread ends (``_say_left_out``). Control characters from the peer's
    bytes (a NUL-padded AE title) are replaced: the log stays text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(_thread_slot, "slot", None) is None:
            return True  # not a connection's thread
        _thread_slot.lines = getattr(_thread_slot, "lines", 0) + 1
        if _thread_slot.lines <= LINES_PER_CONNECTION:
            with contextlib.suppress(Exception):  # the peer's bytes (AE titles, UIDs) end up in these lines
                record.msg, record.args = printable(record.getMessage()), None
            return True
        _thread_slot.left_out = getattr(_thread_slot, "left_out", 0) + 1
        return False


def _serve_connection(slot: Slot) -> None:
    """This thread serves the connection ``slot``: its lines name the peer, and are budgeted."""
    _thread_slot.slot = slot
    _thread_slot.lines = _thread_slot.left_out = 0
    _thread_slot.pending, _thread_slot.unknown_type_said = None, False


def _say_left_out() -> None:
    left_out = getattr(_thread_slot, "left_out", 0)
    if left_out:
        log.warning("dicom: %d more line(s) from pynetdicom about the connection from %s left out of the log",
                    left_out, _thread_peer())
    _thread_slot.slot = None


class _SaidByEndBroken(logging.Filter):
    """The state machine's lines (and traceback) about an event it cannot take or an action that
    raised: it re-raises, and ``_end_broken`` says it in one line with the peer."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info is not None:
            return False
        return not (isinstance(record.msg, str) and record.msg.startswith(
            ("Invalid event '", "State Machine received an exception")))


logging.getLogger("pynetdicom.dul").addFilter(_QuietAfterOurClose())
logging.getLogger("pynetdicom.association").addFilter(_QuietAfterOurClose())
logging.getLogger("pynetdicom.dul").addFilter(_OneLineForUndecodable())
logging.getLogger("pynetdicom.utils").addFilter(_OneLineForUndecodable())  # AE titles and UIDs that are not ASCII
logging.getLogger("pynetdicom.fsm").addFilter(_SaidByEndBroken())
for _name in ("pynetdicom", "pynetdicom._validators", "pynetdicom.acse", "pynetdicom.association", "pynetdicom.dimse",
              "pynetdicom.dimse_messages", "pynetdicom.dimse_primitives", "pynetdicom.dsutils", "pynetdicom.dul",
              "pynetdicom.events", "pynetdicom.fsm", "pynetdicom.pdu", "pynetdicom.pdu_items",
              "pynetdicom.pdu_primitives", "pynetdicom.presentation", "pynetdicom.service_class",
              "pynetdicom.transport", "pynetdicom.utils", "pydicom"):
    logging.getLogger(_name).addFilter(_LinesPerConnection())  # after the filters above: counts what is kept


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
            _serve_connection(slot)
            try:
                run()
            except Exception as exc:  # a peer's bytes pynetdicom's negotiation or reactor did not expect
                _end_broken(assoc, slot, server.slots, exc, "association")
            finally:
                server.slots.release(slot)
                _say_left_out()

        assoc.run = run_then_free_the_slot  # type: ignore[method-assign]
        dul = assoc.dul
        dul_run = dul.run

        def dul_run_or_end() -> None:
            _serve_connection(slot)
            try:
                dul_run()
            except Exception as exc:  # the reactor died: without this the association waits on a dead DUL
                _end_broken(assoc, slot, server.slots, exc, "DUL")
            finally:
                _say_left_out()

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
            log.warning("dicom: " + what + ": %s", slot.peer, ae_title, exc)
        else:
            log.warning("dicom: " + what + ": pynetdicom's %s thread could not go on with what it sent (%s)",
                        slot.peer, ae_title, thread, short_exception(exc))
    assoc_sock = dul.socket
    raw = cast(socket.socket | None, getattr(assoc_sock, "socket", None))
    if raw is not None and state != "Sta13":
        with contextlib.suppress(OSError):
            raw.settimeout(1.0)  # a peer that does not read gets no answer, and no more of our time
            raw.sendall(_ASSOCIATE_RJ_BROKEN if negotiating else _ABORT)
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
