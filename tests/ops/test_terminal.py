"""What ``edge`` prints of DICOM, cloud and box values: never a control code that drives the terminal.

A study whose PatientName, StudyDescription and AccessionNumber carry ``ESC[2J`` (clear the
screen) and the one-byte CSI ``\\x9b`` arrives over DCMTK storescu like any other.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread

from edge.ops.doctor import Item, format_items
from edge.ops.status import format_status
from edge.terminal import printable
from tests.conftest import EdgeNode
from tests.dicom_factory import make_dx

HOSTILE = "\x1b[2J\x9b31m"
C0_C1 = {*range(0x00, 0x20), *range(0x7F, 0xA0)} - {0x0A}  # newline: only where the CLI puts it


def _edge(node: EdgeNode, *args: str) -> bytes:
    return subprocess.run([sys.executable, "-m", "edge", "--config", str(node.config), *args],
                          capture_output=True, timeout=60, check=True).stdout


@pytest.mark.filterwarnings("ignore:Found unknown escape sequence")  # pydicom, reading the hostile file
def test_edge_studies_prints_no_escape_codes_from_dicom_values(node: EdgeNode, tmp_path: Path) -> None:
    path = tmp_path / "hostile.dcm"
    make_dx(path, rows=16, cols=16, accession="A1" + HOSTILE)
    ds = dcmread(path)
    ds.SpecificCharacterSet = "ISO_IR 100"  # Latin-1: \x9b is a byte the DR may send
    ds.PatientName = "Dlamini^" + HOSTILE
    ds.StudyDescription = "Chest " + HOSTILE
    ds.save_as(path)
    result = node.storescu(path)
    assert "Received Store Response (Success)" in result.stdout + result.stderr, result.stderr

    table = _edge(node, "studies")
    text = table.decode("utf-8")
    assert "A1" in text and ds.StudyInstanceUID in text  # the study is listed ...
    assert not C0_C1 & set(text.encode("utf-8")) and not any(0x80 <= ord(c) < 0xA0 for c in text)  # ... inert
    assert text.count("\n") == 2  # header and one row: no line break smuggled in

    listed = json.loads(_edge(node, "studies", "--json"))
    assert listed[0]["accession_number"].startswith("A1\x1b[2J")  # the value itself is kept as received
    raw = _edge(node, "studies", "--json")
    assert b"\x1b" not in raw and b"\xc2\x9b" not in raw and b"\\u001b" in raw  # json.dumps escaped it


def test_status_and_doctor_lines_put_no_peer_value_on_the_terminal_raw() -> None:
    status = {
        "node": {"id": "clinic-0042", "name": "Ikhaya", "ae_title": "EDGE"},
        "services": {"dicom": "up"},
        "outbox": {"depth": 1, "by_state": {"failed": 1}, "oldest_age_s": 60, "last_upload_at": None,
                   "cloud": "https://pacs.example", "last_error": {"state": "failed", "reason": "502 " + HOSTILE + "\n"}},
        "store": {"studies": 1, "instances": 1, "bytes": 10, "files_missing": 0, "data_dir": "var"},
        "disk": {"free_mb": 900, "min_free_mb": 500, "ok": True},
        "boxes": [{"box_id": "ecg" + HOSTILE, "firmware": "1.0\x1b]0;pwned\x07", "battery_pct": 80,
                   "connected": True, "last_seen": None, "lead_off": ["V1\r"]}],
    }
    doctor = format_items([Item("cloud", "fail", "cloud said: " + HOSTILE, "check\x1b[8m the token")])
    for text in (format_status(status), doctor):
        assert not any(ord(c) in C0_C1 for c in text.replace("\n", ""))
    assert "502 ?[2J?31m?" in format_status(status)
    assert printable("Nomvula\u202eevil\udcff") == "Nomvula?evil?"
