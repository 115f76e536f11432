"""How long anyone may take to send a PDU, and how long it may be.

- Every PDU must arrive whole within its deadline (``PduReader``): the first (the
  A-ASSOCIATE-RQ) within the ACSE timeout of the connection, every later one within
  ``network_timeout_s`` of its first byte. pynetdicom's own timer (``network_timeout_s``
  from the last complete PDU) asks for an abort in time, but its read blocked forever on a
  PDU that stopped half-way, so the abort never came and the slot was never freed.
- No PDU may be longer than the node can afford to hold: a P-DATA-TF no longer than the
  ``max_pdu_bytes`` we announced (and some slack), any other PDU ``OTHER_PDU_MAX_BYTES``.
  A longer one is refused from its header (A-ABORT or A-ASSOCIATE-RJ, a close, one line):
  the reader used to buffer whatever length the peer wrote, and one 200 MB P-DATA-TF took
  the node from 75 to 875 MB while pynetdicom decoded it.

The raw A-ASSOCIATE-RJ and A-ABORT PDUs the node writes without pynetdicom live here too:
the reader and the server (edge.dicom.connections) both answer with them.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import cast

from pynetdicom.transport import AssociationSocket

from edge.dicom.peer_log import cut_short
from edge.dicom.slots import Slot

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ: rejected-transient (2), DUL service-provider presentation related (3), local-limit-exceeded (2).
ASSOCIATE_RJ_LOCAL_LIMIT = struct.pack(">BBIBBBB", 0x03, 0x00, 4, 0x00, 0x02, 0x03, 0x02)
# A-ASSOCIATE-RJ: rejected-permanent (1), DUL service-user (1), no-reason-given (1): a request pynetdicom cannot negotiate.
ASSOCIATE_RJ_BROKEN = struct.pack(">BBIBBBB", 0x03, 0x00, 4, 0x00, 0x01, 0x01, 0x01)
# A-ABORT: source DUL service-provider (2), reason not specified (0).
ABORT = struct.pack(">BBIBBBB", 0x07, 0x00, 4, 0x00, 0x00, 0x02, 0x00)
_PDU_TYPES = range(0x01, 0x08)

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
            cut_short.active = self.slot.closed_by_us
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
        cut_short.active = True
        if not already:
            limit = self.max_pdata_bytes if pdu_type == 0x04 else OTHER_PDU_MAX_BYTES
            log.warning("%s the connection from %s%s: a PDU (type 0x%02X) of %d bytes, longer than the %d "
                        "the node accepts (max_pdu_bytes)", "refused" if self._first else "aborted",
                        self.slot.peer, f" ({self.slot.ae_title})" if self.slot.ae_title else "", pdu_type, length,
                        limit)
        with contextlib.suppress(OSError):
            self.sock.settimeout(1.0)  # a peer that does not read gets no more of our time
            self.sock.sendall(ASSOCIATE_RJ_BROKEN if self._first else ABORT)
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
        log.warning("closed the connection from %s%s: %s (%d of %d bytes of this read)",
                    self.slot.peer, f" ({self.slot.ae_title})" if self.slot.ae_title else "", what, nr_read, nr_bytes)


def _ack_at_once(sock: socket.socket) -> None:
    """Acknowledge what arrives without the kernel's delayed ACK (Linux; re-armed before every read)."""
    if _TCP_QUICKACK is not None:
        with contextlib.suppress(OSError):  # not TCP, or the peer is gone: the read will tell
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)

