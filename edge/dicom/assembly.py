"""A bound on how much of one received DIMSE message pynetdicom assembles in memory.

pynetdicom collects a message's command set, and every data set but a C-STORE's (streamed
to a temp file, edge.dicom.receive_file), in a ``BytesIO``, fragment after fragment, until
a fragment says it is the last. A peer whose fragments never say so grew the node's memory
by whatever it sent: a C-FIND at LAN speed took a gigabyte in seconds, and the per-PDU
deadlines (edge.dicom.pdu_reader) do not stop a fast sender.

``DIMSEMessage.decode_msg`` (a pynetdicom internal, hence ``pynetdicom>=3.0,<3.1``) is
wrapped so both buffers refuse to grow past ``DIMSE_COMMAND_SET_MAX_BYTES`` and
``DIMSE_DATA_SET_MAX_BYTES``: the write raises :class:`AssemblyLimitPassed` before the bytes
are copied. It runs in the association's DUL thread, inside the state machine, whose
exception ends the association through ``connections._end_broken``: an A-ABORT, the
connection closed, the slot given back, one warning line naming the peer.

The same wrapper refuses a new message while ``DIMSE_MESSAGES_WAITING_MAX`` complete ones
wait for the association's thread: a peer that streams requests without waiting for the
answers otherwise queued them without limit (pynetdicom's ``msg_queue``).
tests/edge/test_dimse_memory.py streams never-ending messages at a running node.
"""

from __future__ import annotations

from collections.abc import Callable
from io import BytesIO
from typing import Any

from pynetdicom import dimse_messages

from edge.dicom.const import DIMSE_COMMAND_SET_MAX_BYTES, DIMSE_DATA_SET_MAX_BYTES, DIMSE_MESSAGES_WAITING_MAX


class AssemblyLimitPassed(Exception):
    """A peer passed what the node holds in memory for it (a message, or requests waiting); the text fits a log line."""


class _CappedBuffer(BytesIO):
    """A ``BytesIO`` that refuses a write taking it past ``limit`` bytes (what: for the message)."""

    def __init__(self, initial: bytes, limit: int, what: Callable[[], str]) -> None:
        super().__init__(initial)
        self.seek(0, 2)  # pynetdicom appends: keep writing at the end
        self.limit = limit
        self.what = what

    def write(self, data: Any) -> int:
        if self.tell() + len(data) > self.limit:
            raise AssemblyLimitPassed(f"its {self.what()} passed {self.limit // 1024} KiB, the most held in memory")
        return super().write(data)


def _message_name(message: Any) -> str:
    """C-FIND-RQ, once the command set has told; before that, a data set without a command set."""
    name = type(message).__name__
    return "data set without a command set" if name == "DIMSEMessage" else name.replace("_", "-") + " data set"


_original_decode_msg = dimse_messages.DIMSEMessage.decode_msg


def _decode_msg_capped(self: Any, primitive: Any, assoc: Any = None) -> bool:
    """pynetdicom's ``decode_msg``, with both of the message's buffers capped."""
    if type(self.encoded_command_set) is BytesIO:  # the first fragments of a new message
        waiting = _waiting(assoc)
        if waiting >= DIMSE_MESSAGES_WAITING_MAX:
            raise AssemblyLimitPassed(f"it sent {waiting} more requests without waiting for the answers")
        self.encoded_command_set = _CappedBuffer(self.encoded_command_set.getvalue(), DIMSE_COMMAND_SET_MAX_BYTES,
                                                 lambda: "command set")
    if type(self.data_set) is BytesIO:
        self.data_set = _CappedBuffer(self.data_set.getvalue(), DIMSE_DATA_SET_MAX_BYTES,
                                      lambda: _message_name(self))
    return bool(_original_decode_msg(self, primitive, assoc))


def _waiting(assoc: Any) -> int:
    """Complete messages the association's thread has not taken yet."""
    dimse = getattr(assoc, "dimse", None)
    queue = getattr(dimse, "msg_queue", None)
    return int(queue.qsize()) if queue is not None else 0


def install() -> None:
    """Cap every received message's in-memory assembly (process-wide, like pynetdicom's ``_config``)."""
    dimse_messages.DIMSEMessage.decode_msg = _decode_msg_capped  # type: ignore[method-assign]
