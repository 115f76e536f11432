"""Mutated PDUs on raw sockets to a running node: A-ASSOCIATE-RQ, P-DATA-TF, A-RELEASE-RQ.

The PDUs start as real ones: pynetdicom's encoder talking to the node through a recording
proxy (an association, a C-ECHO, a C-STORE, a release). Each case sends a conversation in
which one or more PDUs are mutated (lengths, types, items, bytes) and then hangs up; the
node must close its side within its timeouts, keep answering, and give back every slot:
afterwards ``max_associations`` good associations at once still succeed.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE

from tests.conftest import EdgeNode, free_port
from tests.dicom_factory import DX_STORAGE, make_dx
from tests.edge.helpers import echo_succeeds
from tests.fuzz import mutate
from tests.fuzz.conftest import (
    FUZZ_DICOM,
    NETWORK_TIMEOUT_S,
    Campaign,
    NodeWatch,
    peak_rss_mb,
    traceback_signature,
    tracebacks_in,
)

ACSE_TIMEOUT_S = min(NETWORK_TIMEOUT_S, 10.0)  # edge/dicom/service.py: the ARTIM timer
HANG_S = NETWORK_TIMEOUT_S + ACSE_TIMEOUT_S + 10.0  # after we hang up the node must have closed by then
BATCH = 60
MAX_ASSOCIATIONS = 8  # the node's default [dicom] max_associations


def _proxy(node_port: int, recorded: list[bytes], ready: threading.Event, port: int) -> None:
    """One connection: pass bytes both ways, keep what the client sent."""
    with socket.create_server(("127.0.0.1", port)) as server:
        ready.set()
        client, _ = server.accept()
        upstream = socket.create_connection(("127.0.0.1", node_port))

        def back() -> None:
            while data := upstream.recv(65536):
                client.sendall(data)
            client.close()

        threading.Thread(target=back, daemon=True).start()
        while data := client.recv(65536):
            recorded.append(data)
            upstream.sendall(data)
        upstream.shutdown(socket.SHUT_WR)


def split_pdus(stream: bytes) -> list[bytes]:
    """A byte stream cut into PDUs by their headers (type u8, reserved u8, length u32)."""
    out = []
    while len(stream) >= 6:
        n = struct.unpack(">I", stream[2:6])[0]
        out.append(stream[: 6 + n])
        stream = stream[6 + n :]
    return out


def capture_pdus(node: EdgeNode, tmp: Path) -> dict[str, list[bytes]]:
    """The PDUs pynetdicom sends for an association, C-ECHO, a small C-STORE and a release."""
    make_dx(tmp / "small.dcm", rows=16, cols=16)
    recorded: list[bytes] = []
    ready = threading.Event()
    port = free_port()
    proxy = threading.Thread(target=_proxy, args=(node.port, recorded, ready, port), daemon=True)
    proxy.start()
    assert ready.wait(5)
    ae = AE(ae_title="DR1")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.add_requested_context(DX_STORAGE, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title=node.ae_title)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assert assoc.send_c_store(tmp / "small.dcm").Status == 0
    assoc.release()
    proxy.join(10)
    pdus = split_pdus(b"".join(recorded))
    kinds = [p[0] for p in pdus]
    assert kinds[0] == 0x01 and kinds[-1] == 0x05 and 0x04 in kinds, kinds
    return {"associate": [pdus[0]], "data": [p for p in pdus if p[0] == 0x04], "release": [pdus[-1]]}


# --- PDU-aware mutations -----------------------------------------------------------------------

_EDGE_LENGTHS = (0, 1, 2, 3, 4, 5, 6, 0x44, 0xFF, 0x100, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF)


def _items(pdu: bytes, start: int) -> list[int]:
    """Offsets of the variable items (type u8, reserved u8, length u16) from ``start``."""
    out, i = [], start
    while i + 4 <= len(pdu):
        out.append(i)
        i += 4 + struct.unpack(">H", pdu[i + 2 : i + 4])[0]
    return out


class PduMutator:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.bytes = mutate.Mutator(rng)

    def mutate(self, pdu: bytes) -> tuple[bytes, str]:
        choice = self.rng.randrange(7)
        out = bytearray(pdu)
        if choice == 0:  # the PDU length
            out[2:6] = struct.pack(">I", self.rng.choice((*_EDGE_LENGTHS, len(pdu) - 6 + self.rng.randint(-8, 8))) & 0xFFFFFFFF)
            return bytes(out), "pdu-length"
        if choice == 1:  # the PDU type
            out[0] = self.rng.choice((0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0xFF))
            return bytes(out), "pdu-type"
        if choice == 2 and pdu[0] == 0x01:  # an item (or sub-item) of A-ASSOCIATE-RQ
            items = _items(pdu, 74)
            subs = [j for i in items if pdu[i] in (0x20, 0x50) for j in _items(pdu[: i + 4 + struct.unpack(">H", pdu[i + 2 : i + 4])[0]], i + (8 if pdu[i] == 0x20 else 4))]
            where = self.rng.choice(items + subs) if items else 74
            field = self.rng.randrange(3)
            if field == 0:
                out[where + 2 : where + 4] = struct.pack(">H", self.rng.choice(_EDGE_LENGTHS) & 0xFFFF)
            elif field == 1:
                out[where] = self.rng.choice((0x10, 0x20, 0x21, 0x30, 0x40, 0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x00, 0xFF))
            else:  # an item repeated many times (duplicate user info, 200 presentation contexts)
                n = 4 + struct.unpack(">H", pdu[where + 2 : where + 4])[0]
                item = pdu[where : where + n]
                out[where:where] = item * self.rng.choice((2, 50, 200))
                out[2:6] = struct.pack(">I", len(out) - 6)
            return bytes(out), f"assoc-item-{('length', 'type', 'repeat')[field]}"
        if choice == 3 and pdu[0] == 0x04 and len(pdu) >= 12:  # the PDV item: length, context id, control header
            field = self.rng.randrange(3)
            if field == 0:
                out[6:10] = struct.pack(">I", self.rng.choice(_EDGE_LENGTHS))
            elif field == 1:
                out[10] = self.rng.choice((0, 2, 3, 255, 0x81))
            else:
                out[11] = self.rng.choice((0x00, 0x01, 0x02, 0x03, 0x04, 0xFF))
            return bytes(out), f"pdv-{('length', 'context', 'control')[field]}"
        if choice == 4:  # the AE titles and protocol version of an A-ASSOCIATE-RQ
            if pdu[0] == 0x01:
                where = self.rng.choice((6, 10, 26))
                out[where : where + 2] = self.rng.randbytes(2)
                return bytes(out), "assoc-header"
        body, how = self.bytes.mutate(pdu[6:])
        fix_length = self.rng.random() < 0.7  # mostly keep the PDU framing right, so the body is parsed
        head = pdu[:2] + struct.pack(">I", len(body)) if fix_length else pdu[:6]
        return head + body, "body:" + "+".join(how) + ("" if fix_length else ",length-stale")


def conversation(pdus: dict[str, list[bytes]], mutator: PduMutator, rng: random.Random) -> tuple[list[bytes], str]:
    """One connection's PDUs: the real ones in order, some mutated, sometimes cut short or shuffled."""
    plan = [*pdus["associate"], *rng.choice((pdus["data"][:1], pdus["data"])), *pdus["release"]]
    if rng.random() < 0.2:
        plan = plan[: rng.randint(1, len(plan))]
    if rng.random() < 0.1:
        rng.shuffle(plan)
    how = []
    for _ in range(rng.choice((1, 1, 2))):
        i = rng.choice((0, 0, rng.randrange(len(plan))))
        plan[i], what = mutator.mutate(plan[i])
        how.append(f"{i}:{what}")
    return plan, " ".join(how)


def send_conversation(port: int, plan: list[bytes]) -> float:
    """Send, hang up our side, and return how long the node took to close its side."""
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_S) as sock:
        try:
            for pdu in plan:
                sock.sendall(pdu)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the node already closed on us: fine
            return 0.0
        started = time.monotonic()
        try:
            while sock.recv(65536):
                pass
        except TimeoutError:
            return HANG_S
        except OSError:
            pass
        return time.monotonic() - started


def parallel_good_associations(node: EdgeNode, n: int) -> int:
    """Open ``n`` associations at once, C-ECHO on each while all are held; how many succeeded."""
    ae = AE(ae_title="DR1")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assocs = [ae.associate("127.0.0.1", node.port, ae_title=node.ae_title) for _ in range(n)]
    try:
        return sum(1 for a in assocs if a.is_established and a.send_c_echo().get("Status") == 0)
    finally:
        for a in assocs:
            if a.is_established:
                a.release()


def save_case(plan: list[bytes], name: str, why: str) -> Path:
    return mutate.save_crash(name, b"".join(len(p).to_bytes(4, "big") + p for p in plan), why)


@pytest.fixture(scope="module")
def campaign(fuzz_node: EdgeNode, tmp_path_factory: pytest.TempPathFactory) -> Campaign:
    """Mutated conversations for the budget; the node checked after every batch."""
    rng = random.Random(mutate.seed())
    print(f"\nPDU fuzz: EDGE_FUZZ_SEED={mutate.seed()} (budget {mutate.budget_s():.0f} s)")
    pdus = capture_pdus(fuzz_node, tmp_path_factory.mktemp("pdus"))
    watch = NodeWatch(fuzz_node)
    watch.new_log()
    mutator = PduMutator(rng)
    budget = mutate.Deadline(mutate.budget_s())
    found = Campaign()
    slowest_echo = 0.0  # how long the DR waited after a batch: slots come back only after the node's timeouts
    while budget:
        burst = 1 if rng.random() < 0.9 else MAX_ASSOCIATIONS  # now and then several at once
        plans = [conversation(pdus, mutator, rng) for _ in range(burst)]
        took: list[float] = [0.0] * burst
        threads = [threading.Thread(target=lambda k=k: took.__setitem__(k, send_conversation(fuzz_node.port, plans[k][0])))
                   for k in range(burst)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(HANG_S + 5)
        found.cases += burst
        new_log = watch.new_log()
        found.log_bytes += len(new_log.encode())
        blocks = tracebacks_in(new_log)
        for (plan, how), seconds in zip(plans, took):
            if seconds >= HANG_S:
                key = "hang"
                if key not in found.failures:
                    saved = save_case(plan, f"pdu-hang-{found.cases}.pdus", how)
                    found.failures[key] = (f"mutation {how}: the node kept the connection open {HANG_S:.0f} s after the "
                                           f"peer hung up\ninput kept at {saved} (replay: python -m tests.fuzz.replay pdu {saved} PORT)")
        for block in blocks:  # with a burst, the case is one of the burst's: all are kept
            key = traceback_signature(block)
            if key not in found.tracebacks:
                saved = [save_case(plan, f"pdu-{found.cases}-{k}.pdus", how) for k, (plan, how) in enumerate(plans)]
                found.tracebacks[key] = (f"{key}\nmutation(s) {'; '.join(h for _, h in plans)}\n{block[:2500]}\n"
                                         f"input(s) kept at {' '.join(map(str, saved))} (replay: python -m tests.fuzz.replay pdu FILE PORT)")
        watch.alive()
        if found.cases % BATCH < burst:
            slowest_echo = max(slowest_echo, watch.check(echo_within=ACSE_TIMEOUT_S + NETWORK_TIMEOUT_S + 5))
    slowest_echo = max(slowest_echo, watch.check(echo_within=ACSE_TIMEOUT_S + NETWORK_TIMEOUT_S + 5))
    print(f"\n{found.cases} mutated conversations; peak RSS {peak_rss_mb(fuzz_node):.0f} MB; C-ECHO after a batch "
          f"waited up to {slowest_echo:.1f} s; {found.log_bytes / max(found.cases, 1):.0f} log bytes per conversation; "
          f"{len(found.tracebacks)} distinct uncaught exception(s)")
    return found


def test_mutated_pdus_leave_the_node_answering_with_every_slot_back(fuzz_node: EdgeNode, campaign: Campaign) -> None:
    assert not campaign.failures, campaign.report(campaign.failures)
    assert campaign.cases >= 50, "the budget allowed too few cases to mean anything"
    # Every slot comes back: after the ACSE timeout, max_associations good ones at once, then in a row.
    deadline = time.monotonic() + ACSE_TIMEOUT_S + NETWORK_TIMEOUT_S + 10
    while (held := parallel_good_associations(fuzz_node, MAX_ASSOCIATIONS)) < MAX_ASSOCIATIONS:
        assert time.monotonic() < deadline, f"only {held} of {MAX_ASSOCIATIONS} associations at once: slots leaked"
        time.sleep(0.5)
    assert all(echo_succeeds(fuzz_node) for _ in range(MAX_ASSOCIATIONS))  # DCMTK echoscu, one after another
    assert fuzz_node.proc is not None and fuzz_node.proc.poll() is None


def test_mutated_pdus_raise_no_uncaught_exception_in_the_node(campaign: Campaign) -> None:
    """A thread dying on a peer's bytes is a bug even when the node survives it; a traceback pynetdicom
    logs for a PDU it could not decode is one too (a stranger in a loop fills the SD card)."""
    assert not campaign.tracebacks, campaign.report(campaign.tracebacks)
    # A few lines per hostile connection (accepted, what went wrong), never a traceback's worth.
    assert campaign.log_bytes / campaign.cases < 1000, f"{campaign.log_bytes / campaign.cases:.0f} log bytes per conversation"


def test_pipelined_p_data_for_an_unproposed_context_gives_its_slot_back(node_factory: Any, tmp_path: Path) -> None:
    """Found by the PDU fuzzer: A-ASSOCIATE-RQ, then at once a P-DATA-TF on context 0x81 (never
    proposed), then A-RELEASE-RQ. pynetdicom aborts (Sta13), the acceptor's A-ASSOCIATE-AC then
    arrives as Evt7 in Sta13, InvalidEventError kills the DUL reactor thread, and the association
    thread holds its slot for good: eight such connections lock the DR out."""
    node = node_factory(dicom=FUZZ_DICOM).start()
    pdus = capture_pdus(node, tmp_path)
    p_data = bytearray(pdus["data"][0])
    p_data[10] = 0x81  # the PDV's presentation context id
    plan = [pdus["associate"][0], bytes(p_data), pdus["release"][0]]
    for _ in range(MAX_ASSOCIATIONS):
        send_conversation(node.port, plan)
    deadline = time.monotonic() + ACSE_TIMEOUT_S + NETWORK_TIMEOUT_S + 10
    while (held := parallel_good_associations(node, MAX_ASSOCIATIONS)) < MAX_ASSOCIATIONS:
        assert time.monotonic() < deadline, f"only {held} of {MAX_ASSOCIATIONS} associations at once: slots leaked"
        time.sleep(0.5)
    assert "Exception in thread" not in node.log_text()


def _first_presentation_context(rq: bytes) -> tuple[int, int]:
    """Offset and total length of the A-ASSOCIATE-RQ's first presentation context item (0x20)."""
    for at in _items(rq, 74):
        if rq[at] == 0x20:
            return at, 4 + struct.unpack(">H", rq[at + 2 : at + 4])[0]
    raise AssertionError("no presentation context in the captured A-ASSOCIATE-RQ")


def with_even_context_id(rq: bytes) -> bytes:
    """Presentation context ids are odd (PS3.8 9.3.2.2): pynetdicom decodes the PDU, then raises making the request."""
    at, _ = _first_presentation_context(rq)
    out = bytearray(rq)
    out[at + 4] = 0x02
    return bytes(out)


def without_transfer_syntax(rq: bytes) -> bytes:
    """The first presentation context keeps its abstract syntax and loses every transfer syntax sub-item."""
    at, n = _first_presentation_context(rq)
    subs = [j for j in _items(rq[: at + n], at + 8) if rq[j] != 0x40]
    item_body = rq[at + 4 : at + 8] + b"".join(rq[j : j + 4 + struct.unpack(">H", rq[j + 2 : j + 4])[0]] for j in subs)
    item = rq[at : at + 2] + struct.pack(">H", len(item_body)) + item_body
    body = rq[6:at] + item + rq[at + n :]
    return rq[:2] + struct.pack(">I", len(body)) + body


def answers_to(port: int, plan: list[bytes]) -> tuple[list[int], int, bool]:
    """Send the plan without hanging up: the PDU types the node answered, our port, and whether it closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_S) as sock:
        ours = sock.getsockname()[1]
        with contextlib.suppress(OSError):
            for pdu in plan:
                sock.sendall(pdu)
        received = b""
        closed = False
        with contextlib.suppress(OSError):
            while data := sock.recv(65536):
                received += data
            closed = True
    return [p[0] for p in split_pdus(received)], ours, closed


@pytest.mark.parametrize("case", ["even-context-id", "no-transfer-syntax", "release-rp-while-negotiating"])
def test_requests_pynetdicom_cannot_take_end_cleanly_in_one_line(node_factory: Any, tmp_path: Path, case: str) -> None:
    """Found by the PDU fuzzer: an even presentation context id (ValueError making the request in
    the DUL thread), a context with no transfer syntax (IndexError in negotiate_as_acceptor, in
    the association thread), a P-DATA-TF turned A-RELEASE-RP before the node answered (an event
    the state machine has no transition for). Each killed a pynetdicom thread with a traceback;
    now the peer gets an A-ASSOCIATE-RJ or A-ABORT and a close, the log one warning naming it."""
    node = node_factory(dicom=FUZZ_DICOM).start()
    pdus = capture_pdus(node, tmp_path)
    rq = pdus["associate"][0]
    if case == "even-context-id":
        plans, answers = [[with_even_context_id(rq)]], {0x03}
    elif case == "no-transfer-syntax":
        plans, answers = [[without_transfer_syntax(rq)]], {0x03}
    else:  # the A-ASSOCIATE-AC may go out before the A-ABORT: both are clean
        release_rp = b"\x06" + pdus["data"][0][1:]
        plans, answers = [[rq, release_rp]], {0x07}
    before = len(node.log_text())
    for plan in plans * MAX_ASSOCIATIONS:  # as many as the node has slots: none may be kept
        types, ours, closed = answers_to(node.port, plan)
        assert closed, f"{case}: the node kept the connection open"
        assert answers & set(types), f"{case}: answered {types}, expected one of {sorted(answers)}"
        log = node.log_text()[before:]
        assert "Traceback" not in log and "Exception in thread" not in log, log
        if case != "release-rp-while-negotiating":  # there pynetdicom may also end it by the book
            lines = [ln for ln in log.splitlines() if f"127.0.0.1:{ours}" in ln]
            assert len(lines) == 1 and " WARNING " in lines[0], lines
    deadline = time.monotonic() + ACSE_TIMEOUT_S + NETWORK_TIMEOUT_S + 10
    while (held := parallel_good_associations(node, MAX_ASSOCIATIONS)) < MAX_ASSOCIATIONS:
        assert time.monotonic() < deadline, f"only {held} of {MAX_ASSOCIATIONS} associations at once: slots leaked"
        time.sleep(0.5)


def test_an_undecodable_pdu_is_one_line_without_traceback(node_factory: Any, tmp_path: Path) -> None:
    """pynetdicom logged a full traceback for every PDU it could not decode: a stranger's loop filled the card."""
    node = node_factory(dicom=FUZZ_DICOM).start()
    pdus = capture_pdus(node, tmp_path)
    rq = bytearray(pdus["associate"][0])
    at, _ = _first_presentation_context(bytes(rq))
    rq[at + 2 : at + 4] = struct.pack(">H", 0xFFFF)  # an item running past the end of its PDU
    before = len(node.log_text())
    types, ours, closed = answers_to(node.port, [bytes(rq)])
    assert closed and types and types[0] in (0x03, 0x07), types
    deadline = time.monotonic() + 10
    while not (lines := [ln for ln in node.log_text()[before:].splitlines() if f"127.0.0.1:{ours}" in ln]):
        assert time.monotonic() < deadline, node.log_text()[before:]
        time.sleep(0.1)
    log = node.log_text()[before:]
    assert "Traceback" not in log, log
    assert len(lines) == 1 and "could not be decoded" in lines[0], lines
    assert echo_succeeds(node)


def test_peers_stalled_inside_mutated_pdus_are_dropped_within_the_deadline(fuzz_node: EdgeNode, fuzz_rng: random.Random, tmp_path: Path) -> None:
    pdus = capture_pdus(fuzz_node, tmp_path)
    mutator = PduMutator(fuzz_rng)
    held = []
    for _ in range(MAX_ASSOCIATIONS + 2):  # every slot, and more, held by peers that stop mid-PDU
        plan, _ = conversation(pdus, mutator, fuzz_rng)
        sock = socket.create_connection(("127.0.0.1", fuzz_node.port), timeout=5)
        stream = b"".join(plan)
        sock.sendall(stream[: fuzz_rng.randrange(1, len(stream))])
        held.append(sock)
    try:
        deadline = time.monotonic() + 15  # issue 12: the DR gets in within 15 s of any number of stalled peers
        while not echo_succeeds(fuzz_node):
            assert time.monotonic() < deadline, "the DR is still held out by stalled peers"
            time.sleep(0.5)
    finally:
        for sock in held:
            sock.close()
