"""A stranger cannot exhaust the node's memory (or disk) with one DIMSE message that never ends.

pynetdicom assembles a DIMSE message's command set and (except a C-STORE's, streamed to a
temp file) its data set in memory, fragment after fragment, until a fragment says it is the
last. The sender here is a raw socket: a valid association as the clinic's DR (DR1 from
loopback, so no per-address cap gets in the way), then P-DATA-TF PDUs as fast as the
loopback takes them, whose fragments never say "last", about 200 MB of them. The node must
end the association (A-ABORT, connection closed, one warning line), stay under its memory
cap, leave nothing in its temp directory and answer the DR's C-ECHO (DCMTK) right after.

Two neighbours of the same attack end the same way: one P-DATA-TF PDU announcing 200 MB
(the node used to buffer all of it, then decode it: 875 MB), and C-ECHO-RQs streamed without
waiting for the answers (each queued for the association's thread: 100 MB took 450 MB).

A C-STORE whose data set passes ``[storage] max_instance_mb`` is different: its temp file
stops growing at the cap and, when the data ends, the DR gets 0xA700 with a comment.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from typing import Any

import pytest
from pynetdicom.dimse_messages import C_ECHO_RQ, C_FIND_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_STORE
from pynetdicom.dsutils import decode

from edge.dicom.const import DIMSE_COMMAND_SET_MAX_BYTES, DIMSE_DATA_SET_MAX_BYTES
from edge.dicom.pdu_reader import PDATA_SLACK_BYTES
from tests.conftest import EdgeNode
from tests.edge.helpers import associate_rq, echo_succeeds, temp_files
from tests.fuzz.conftest import MEMORY_CAP_MB, peak_rss_mb
from tests.waiting import wait_until

DR = {"modality_ae": "DR1", "modality_host": "127.0.0.1"}
VERIFICATION = "1.2.840.10008.1.1"
WORKLIST_FIND = "1.2.840.10008.5.1.4.31"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
SEND_MB = 200
FRAGMENT = 128 * 1024 - 64  # one P-DATA-TF PDU each, under the node's 256 KiB max_pdu_bytes
MAX_INSTANCE_MB = 16  # the smallest [storage] max_instance_mb
MiB = 1 << 20


def p_data(control: int, payload: bytes) -> bytes:
    """One P-DATA-TF PDU with one fragment (PDV) on context 1; ``control``: PS3.8 E.2 header."""
    pdv = struct.pack(">LBB", len(payload) + 2, 1, control) + payload
    return struct.pack(">BBL", 0x04, 0x00, len(pdv)) + pdv


def command_set(message: Any) -> bytes:
    """The encoded command set of a DIMSE message (its first fragment, which says last)."""
    fragment = next(iter(message.encode_msg(1, 0))).presentation_data_value_list[0][1]
    assert fragment[0] & 0x03 == 0x03
    return bytes(fragment[1:])


def find_command() -> bytes:
    primitive = C_FIND()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = WORKLIST_FIND
    primitive.Priority = 2
    primitive.Identifier = BytesIO(b"\x00")
    message = C_FIND_RQ()
    message.primitive_to_message(primitive)
    return command_set(message)


def store_command() -> bytes:
    primitive = C_STORE()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = CR_IMAGE
    primitive.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.9.9999.12.1"
    primitive.Priority = 2
    primitive.DataSet = BytesIO(b"\x00")
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return command_set(message)


def echo_command() -> bytes:
    primitive = C_ECHO()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = VERIFICATION
    message = C_ECHO_RQ()
    message.primitive_to_message(primitive)
    return command_set(message)


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = _read_exactly(sock, 6)
    pdu_type, _, length = struct.unpack(">BBL", header)
    return pdu_type, _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, nr_bytes: int) -> bytes:
    data = b""
    while len(data) < nr_bytes:
        got = sock.recv(nr_bytes - len(data))
        if not got:
            raise ConnectionError(f"closed after {len(data)} of {nr_bytes} bytes")
        data += got
    return data


class Sender:
    """The stranger's connection: associated, then streaming P-DATA-TF as fast as it can."""

    def __init__(self, node: EdgeNode, abstract_syntax: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", node.port), timeout=30)
        self.sock.sendall(associate_rq(calling="DR1", abstract_syntax=abstract_syntax, transfer_syntaxes=[EXPLICIT_LE]))
        pdu_type, _ = read_pdu(self.sock)
        assert pdu_type == 0x02, f"association not accepted (PDU type 0x{pdu_type:02X})"
        self.sent = 0

    def stream(self, control: int, total: int, first: bytes = b"", block: bytes | None = None) -> bool:
        """Send ``first`` then ``block`` (by default one PDU of fragments with ``control``) until ``total``
        bytes are sent; False: the node closed."""
        block = p_data(control, b"\x00" * FRAGMENT) if block is None else block
        try:
            if first:
                self.sock.sendall(first)
            while self.sent < total:
                self.sock.sendall(block)
                self.sent += len(block)
        except OSError:  # reset or broken pipe: the node ended it
            return False
        return True

    def answer(self) -> tuple[int, bytes]:
        """The node's next PDU (type, body)."""
        self.sock.settimeout(30)
        return read_pdu(self.sock)

    def aborted(self) -> bool:
        """Whether the node sent an A-ABORT and closed (what remains unread of our stream aside)."""
        self.sock.settimeout(30)
        seen_abort = False
        try:
            while True:
                pdu_type, _ = read_pdu(self.sock)
                seen_abort = seen_abort or pdu_type == 0x07
        except (ConnectionError, OSError):
            return seen_abort

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def dr_node(node_factory: Any) -> Iterator[EdgeNode]:
    node = node_factory(dicom=DR, storage={"max_instance_mb": MAX_INSTANCE_MB}).start()
    yield node


def warnings_about_overflow(node: EdgeNode, says: str = "held in memory") -> list[str]:
    return [line for line in node.log_text().splitlines() if says in line]


def assert_ended_cleanly(node: EdgeNode, sender: Sender, kept_going: bool, what: str,
                         says: str = "held in memory") -> None:
    assert not kept_going, f"the node took all {SEND_MB} MB of a never-ending {what}"
    assert sender.aborted(), "no A-ABORT before the close"
    assert sender.sent < SEND_MB * MiB
    peak = peak_rss_mb(node)
    assert peak < MEMORY_CAP_MB, f"node peak memory {peak:.0f} MB after {sender.sent / MiB:.0f} MB of a {what}"
    wait_until(lambda: len(warnings_about_overflow(node, says)) == 1, 20, f"one {says!r} warning", every=0.05,
               detail=lambda: node.log_text()[-3000:])
    log = node.log_text()
    assert len([line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]) == 1, log[-3000:]
    line = warnings_about_overflow(node, says)[0]
    assert "WARNING" in line and "127.0.0.1:" in line and "DR1" in line, line
    assert "Traceback" not in log, log[-3000:]
    assert temp_files(node) == []
    assert echo_succeeds(node), "the DR's C-ECHO failed after the stranger"


def test_a_c_find_identifier_that_never_ends_is_aborted_at_its_cap(dr_node: EdgeNode) -> None:
    sender = Sender(dr_node, WORKLIST_FIND)
    try:
        kept_going = sender.stream(0x00, SEND_MB * MiB, first=p_data(0x03, find_command()))
        assert_ended_cleanly(dr_node, sender, kept_going, "C-FIND identifier")
        assert sender.sent <= DIMSE_DATA_SET_MAX_BYTES + 64 * MiB  # what the sockets' buffers took besides
        assert "C-FIND-RQ data set" in warnings_about_overflow(dr_node)[0]
    finally:
        sender.close()


def test_a_command_set_that_never_ends_is_aborted_at_its_cap(dr_node: EdgeNode) -> None:
    sender = Sender(dr_node, CR_IMAGE)
    try:
        kept_going = sender.stream(0x01, SEND_MB * MiB)
        assert_ended_cleanly(dr_node, sender, kept_going, "command set")
        assert sender.sent <= DIMSE_COMMAND_SET_MAX_BYTES + 64 * MiB
        assert "command set" in warnings_about_overflow(dr_node)[0]
    finally:
        sender.close()


def test_one_p_data_pdu_longer_than_max_pdu_bytes_is_aborted_from_its_header(dr_node: EdgeNode) -> None:
    sender = Sender(dr_node, CR_IMAGE)
    try:
        length = SEND_MB * MiB
        header = struct.pack(">BBL", 0x04, 0x00, length + 6) + struct.pack(">LBB", length + 2, 1, 0x00)
        kept_going = sender.stream(0x00, SEND_MB * MiB, first=header, block=b"\x00" * MiB)
        assert_ended_cleanly(dr_node, sender, kept_going, "P-DATA-TF PDU", says="longer than the")
        assert f"longer than the {256 * 1024 + PDATA_SLACK_BYTES} the node accepts" in dr_node.log_text()
    finally:
        sender.close()


def test_requests_streamed_without_waiting_for_answers_are_aborted(dr_node: EdgeNode) -> None:
    """Answers read as they come (a thread drains them), requests sent as fast as the node reads."""
    sender = Sender(dr_node, VERIFICATION)
    answers = [0]

    def read_answers() -> None:
        try:
            while got := sender.sock.recv(1 << 20):
                answers[0] += len(got)
        except OSError:
            pass

    reader = threading.Thread(target=read_answers, daemon=True)
    reader.start()
    try:
        kept_going = sender.stream(0x03, SEND_MB * MiB, block=p_data(0x03, echo_command()) * 1000)
        reader.join(30)
        assert not reader.is_alive(), "the node did not close the connection"
        assert not kept_going, f"the node took all {SEND_MB} MB of requests"
        peak = peak_rss_mb(dr_node)
        assert peak < MEMORY_CAP_MB, f"node peak memory {peak:.0f} MB after {sender.sent / MiB:.0f} MB of requests"
        wait_until(lambda: len(warnings_about_overflow(dr_node, "without waiting for the answers")) == 1, 20,
                   "one \"without waiting for the answers\" warning", every=0.05)
        line = warnings_about_overflow(dr_node, "without waiting for the answers")[0]
        assert "WARNING" in line and "127.0.0.1:" in line and "DR1" in line, line
        assert "Traceback" not in dr_node.log_text()
        assert echo_succeeds(dr_node)
    finally:
        sender.close()


def test_a_c_store_past_max_instance_mb_stops_growing_on_disk_and_is_refused(dr_node: EdgeNode) -> None:
    """Received bytes past the cap are dropped, the temp file truncated; the DR gets 0xA700 at the end."""
    largest = [0]
    done = threading.Event()

    def watch_temp_dir() -> None:
        while not done.is_set():
            sizes = [p.stat().st_size for p in temp_files(dr_node) if p.exists()]
            largest[0] = max([largest[0], *sizes])
            time.sleep(0.01)

    watcher = threading.Thread(target=watch_temp_dir, daemon=True)
    watcher.start()
    sender = Sender(dr_node, CR_IMAGE)
    try:
        assert sender.stream(0x00, SEND_MB * MiB, first=p_data(0x03, store_command()))
        sender.sock.sendall(p_data(0x02, b"\x00" * 16))  # the last fragment
        pdu_type, body = sender.answer()
        assert pdu_type == 0x04, f"no C-STORE-RSP (PDU type 0x{pdu_type:02X})"
        response = decode(BytesIO(body[6:]), True, True)
        assert response.Status == 0xA700
        assert f"{MAX_INSTANCE_MB} MB" in str(response.ErrorComment)
    finally:
        done.set()
        watcher.join()
        sender.close()
    assert largest[0] <= MAX_INSTANCE_MB * MiB + 64 * 1024, f"temp file grew to {largest[0] / MiB:.0f} MB"
    peak = peak_rss_mb(dr_node)
    assert peak < MEMORY_CAP_MB, f"node peak memory {peak:.0f} MB"
    wait_until(lambda: temp_files(dr_node) == [], 20, "no temp files left", every=0.05)
    refusals = [line for line in dr_node.log_text().splitlines() if "refused instance" in line]
    assert len(refusals) == 1 and "max_instance_mb" in refusals[0], refusals
    assert "Traceback" not in dr_node.log_text()
    assert echo_succeeds(dr_node)
