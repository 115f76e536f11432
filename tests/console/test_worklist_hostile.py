"""Worklist queries a hostile peer can send: broken identifiers are refused, hostile wildcards cost nothing.

Before: pydicom read random bytes as a dataset of one unknown element (a length running
past the end is silently cut short), no worklist key was present, and "no keys" answered
all of today's patients. And ``PatientName=*?*?*?*?*?*?*?*Q`` against one long name held
the GIL for 10 s (a backtracking regex): C-ECHO, console and kiosk all stopped.
"""

from __future__ import annotations

import random
import struct
import subprocess
import threading
import time
import zlib
from io import BytesIO
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import decode, encode

from tests.conftest import DCMTK, EdgeNode
from tests.console.conftest import ADMIN, ADMIN_PASSWORD
from tests.console.helpers import ConsoleClient, find_answers, findscu
from tests.console.mwl import raw_find
from tests.edge.helpers import echo_succeeds

LONG_NAME = "Mahlangu-Ramaphosa-Nkosi^Nomvula Thandiwe Precious"  # 51 characters, as registered at a real desk
HOSTILE = "*?*?*?*?*?*?*?*Q"


def _query(**keys: Any) -> Dataset:
    ds = Dataset()
    ds.PatientName = "*"
    ds.PatientID = ""
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _explicit(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2s2xL", group, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _implicit(group: int, elem: int, value: bytes) -> bytes:
    return struct.pack("<HHL", group, elem, len(value)) + value


def _bad_date() -> bytes:
    step = Dataset()
    step.ScheduledProcedureStepStartDate = "19000101-garbage"
    return encode(_query(ScheduledProcedureStepSequence=[step]), True, True)


VALID = encode(_query(), True, True)
VALID_EXPLICIT = encode(_query(), False, True)
RNG = random.Random(12)
BROKEN: list[tuple[str, bytes, str]] = [
    *[(f"random bytes #{n}", RNG.randbytes(RNG.randrange(9, 300)), ImplicitVRLittleEndian) for n in range(12)],
    *[(f"random bytes, explicit #{n}", RNG.randbytes(RNG.randrange(9, 300)), ExplicitVRLittleEndian) for n in range(6)],
    ("text", b"hello, this is not a DICOM dataset at all", ImplicitVRLittleEndian),
    ("cut short", VALID[:-3], ImplicitVRLittleEndian),
    ("trailing bytes", VALID + b"\x00\x00\x00", ImplicitVRLittleEndian),
    ("private element, creator in another group", VALID + _implicit(0x0011, 0x0010, b"ED") + _implicit(0x7FE1, 0x2222, b"xx"),
     ImplicitVRLittleEndian),
    ("not a DICOM attribute", _implicit(0x0010, 0x0010, b"*\x00") + _implicit(0x0010, 0x0ABC, b"xx"),
     ImplicitVRLittleEndian),
    ("private element without its creator", VALID + _implicit(0x0011, 0x1001, b"xx"), ImplicitVRLittleEndian),
    ("out of order", _implicit(0x0010, 0x0020, b"") + _implicit(0x0010, 0x0010, b"*\x00"), ImplicitVRLittleEndian),
    ("repeated", _implicit(0x0010, 0x0010, b"*\x00") + _implicit(0x0010, 0x0010, b"*\x00"), ImplicitVRLittleEndian),
    ("odd length", _implicit(0x0010, 0x0010, b"*"), ImplicitVRLittleEndian),
    ("wrong VR", _explicit(0x0010, 0x0010, b"US", b"\x01\x00"), ExplicitVRLittleEndian),
    ("no VR", _explicit(0x0010, 0x0010, b"\x00\x00", b"*\x00"), ExplicitVRLittleEndian),
    ("sequence that is not one", _implicit(0x0040, 0x0100, b"ABCD"), ImplicitVRLittleEndian),
    ("item without delimiter", _implicit(0x0040, 0x0100, b"")[:4] + b"\xff\xff\xff\xff"
     + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + _implicit(0x0008, 0x0060, b"DX"), ImplicitVRLittleEndian),
    ("multi-valued name", encode(_query(PatientName=["Dlamini*", "Nkosi*"]), True, True), ImplicitVRLittleEndian),
    ("undecodable name", _implicit(0x0008, 0x0005, b"ISO_IR 192") + _implicit(0x0010, 0x0010, b"\xff\xfeD*"),
     ImplicitVRLittleEndian),
    ("unknown character set", _implicit(0x0008, 0x0005, b"ISO_IR 999") + _implicit(0x0010, 0x0010, b"D*"),
     ImplicitVRLittleEndian),
    ("date garbage", _bad_date(), ImplicitVRLittleEndian),
    ("deflate bomb", zlib.compress(b"\x00" * (20 << 20))[2:-4], DeflatedExplicitVRLittleEndian),
    ("deflate garbage", b"\xff" * 64, DeflatedExplicitVRLittleEndian),
]


def _register_two(node: EdgeNode) -> None:
    client = ConsoleClient(node)
    assert client.login(ADMIN, ADMIN_PASSWORD) == 303
    client.register(surname="Dlamini", given_names="Thandi", sex="F", id_number="8001015009087")
    client.register(surname="Nkosi", given_names="Sipho", sex="M", folder_number="F-1234", birth_date="1975-03-02")


def test_broken_identifiers_from_the_dr_itself_are_refused_never_answered_as_everything(cnode: EdgeNode) -> None:
    _register_two(cnode)
    assert [r.status for r in raw_find(cnode, VALID)] == [0xFF00, 0xFF00, 0x0000]  # the same client, a good query
    for name, identifier, syntax in BROKEN:
        responses = raw_find(cnode, identifier, transfer_syntax=syntax)
        assert len(responses) == 1, (name, [r.status for r in responses])
        rsp = responses[0]
        assert rsp.status in (0xA900, 0xC000) and rsp.identifier == b"", (name, hex(rsp.status))
        assert rsp.error_comment, name  # a reason the DR can show
    log = cnode.log_text()
    assert log.count("worklist query from DR (127.0.0.1) refused") == len(BROKEN)
    assert "Traceback" not in log
    assert echo_succeeds(cnode)
    good = findscu(cnode, "PatientName=*", "PatientID")
    assert good.returncode == 0 and len(find_answers(cnode)) == 2


def test_a_deflated_query_is_read_and_answered_deflated(cnode: EdgeNode) -> None:
    _register_two(cnode)
    identifier = encode(_query(PatientName="nkosi*"), False, True, deflated=True)
    responses = raw_find(cnode, identifier, transfer_syntax=DeflatedExplicitVRLittleEndian)
    assert [r.status for r in responses] == [0xFF00, 0x0000]
    answer = decode(BytesIO(responses[0].identifier), False, True, deflated=True)
    assert answer.PatientID == "F-1234"
    explicit = raw_find(cnode, VALID_EXPLICIT, transfer_syntax=ExplicitVRLittleEndian)
    assert [r.status for r in explicit] == [0xFF00, 0xFF00, 0x0000]


@pytest.fixture
def busy_day(cnode: EdgeNode) -> EdgeNode:
    """500 patients with long names on today's worklist, written into the running node's store."""
    from edge.orders.register import ExamChoice, Patient, create_order
    from edge.store.db import database, open_database

    open_database(cnode.data_dir, migrate=False)
    database.execute_sql("PRAGMA synchronous=OFF")  # this test's own connection: seeding, not a C-STORE
    try:
        for i in range(500):
            patient = Patient(f"{LONG_NAME}{i:03d}", f"F-{i:05d}", "folder", "19800101", "F",
                              ExamChoice("Chest X-ray", "DX"))
            create_order(patient, node_id="clinic-0042", station_ae="DR", by="test")
    finally:
        database.close()
    return cnode


def test_a_hostile_wildcard_against_500_long_names_answers_at_once(busy_day: EdgeNode) -> None:
    """Before: 10 s per long name. The precise figure: bench/console.py (hostile key row)."""
    for key, expect in ((HOSTILE, 0), ("*?*?*?*?*?*?*?*7", 50), ("*?" * 40 + "*Q", 0), ("mahlangu*", 500)):
        start = time.perf_counter()
        result = findscu(busy_day, f"PatientName={key}", "PatientID")
        elapsed = time.perf_counter() - start
        assert result.returncode == 0 and "Success" in result.stdout + result.stderr
        assert len(find_answers(busy_day)) == expect, key
        assert elapsed < 5.0, (key, elapsed)  # generous: a busy 2-core box; the regex took hours for 500 names


def test_c_echo_is_answered_while_hostile_queries_run(busy_day: EdgeNode) -> None:
    """Two associations keep sending hostile queries; a third one's C-ECHO still gets its answer promptly."""
    stop = threading.Event()
    outcomes: list[bool] = []

    def flood() -> None:
        while not stop.is_set():
            result = subprocess.run(
                [str(DCMTK / "findscu"), "-W", "-v", "-aet", "DR", "-aec", busy_day.ae_title,
                 "-k", "PatientName=" + "*?" * 40 + "*Q", "-k", "PatientID", "127.0.0.1", str(busy_day.port)],
                capture_output=True, text=True, timeout=60)
            outcomes.append("Received Final Find Response (Success)" in result.stdout + result.stderr)

    floods = [threading.Thread(target=flood, daemon=True) for _ in range(2)]
    for thread in floods:
        thread.start()
    try:
        echo_times = []
        for _ in range(5):
            start = time.perf_counter()
            assert echo_succeeds(busy_day)
            echo_times.append(time.perf_counter() - start)
    finally:
        stop.set()
        for thread in floods:
            thread.join(60)
    assert max(echo_times) < 3.0, echo_times  # before: every echo waited out a 10 s match
    assert outcomes and all(outcomes)
