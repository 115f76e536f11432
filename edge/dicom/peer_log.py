"""pynetdicom's and pydicom's lines about a connection, kept to one line per event per peer.

A stranger on the clinic LAN chooses what pynetdicom logs: a traceback for every PDU it
cannot decode, an "unknown PDU type" line per six bytes of garbage, a warning per bad UID
in a PDU. Left alone, one peer in a loop would fill the SD card. These filters on
pynetdicom's loggers (they match its message texts) fold such lines into one with the
peer's address, drop those the node has already said in its own words, and write at most
``LINES_PER_CONNECTION`` per connection thread, control characters replaced. They are
installed by ``install()`` (edge.dicom.patches, from the DICOM service's start).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import cast

from edge.dicom.slots import Slot
from edge.terminal import printable

log = logging.getLogger(__name__)

# Set in a DUL thread whose read we cut short (edge.dicom.pdu_reader): pynetdicom's own
# complaint about the short PDU that follows says nothing our line did not (see _QuietAfterOurClose).
cut_short = threading.local()


class _QuietAfterOurClose(logging.Filter):
    """Drop pynetdicom's lines about a connection we close and log ourselves, with its peer address."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("The received PDU is shorter than expected"):
            return not getattr(cut_short, "active", False)
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
    one line when the thread ends (``say_left_out``). Control characters from the peer's
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


def serve_connection(slot: Slot) -> None:
    """This thread serves the connection ``slot``: its lines name the peer, and are budgeted."""
    _thread_slot.slot = slot
    _thread_slot.lines = _thread_slot.left_out = 0
    _thread_slot.pending, _thread_slot.unknown_type_said = None, False


def say_left_out() -> None:
    left_out = getattr(_thread_slot, "left_out", 0)
    if left_out:
        log.warning("%d more line(s) from pynetdicom about the connection from %s left out of the log",
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


def install() -> None:
    """Put the filters on pynetdicom's and pydicom's loggers (edge.dicom.patches, once per process)."""
    logging.getLogger("pynetdicom.dul").addFilter(_QuietAfterOurClose())
    logging.getLogger("pynetdicom.association").addFilter(_QuietAfterOurClose())
    logging.getLogger("pynetdicom.dul").addFilter(_OneLineForUndecodable())
    logging.getLogger("pynetdicom.utils").addFilter(_OneLineForUndecodable())  # AE titles and UIDs that are not ASCII
    logging.getLogger("pynetdicom.fsm").addFilter(_SaidByEndBroken())
    for name in ("pynetdicom", "pynetdicom._validators", "pynetdicom.acse", "pynetdicom.association", "pynetdicom.dimse",
                 "pynetdicom.dimse_messages", "pynetdicom.dimse_primitives", "pynetdicom.dsutils", "pynetdicom.dul",
                 "pynetdicom.events", "pynetdicom.fsm", "pynetdicom.pdu", "pynetdicom.pdu_items",
                 "pynetdicom.pdu_primitives", "pynetdicom.presentation", "pynetdicom.service_class",
                 "pynetdicom.transport", "pynetdicom.utils", "pydicom"):
        logging.getLogger(name).addFilter(_LinesPerConnection())  # after the filters above: counts what is kept
