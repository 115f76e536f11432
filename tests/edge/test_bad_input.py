"""What the DR (and its technician) sees when it sends the node something it cannot keep.

Every case checks the answer on the wire (an association rejection, a DICOM status), that
nothing was half-kept (no spool file, no temp file, no rows) and that the node stays up.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EdgeNode
from tests.dicom_factory import DX_STORAGE, make_dx
from tests.edge.helpers import (
    echo,
    echo_succeeds,
    outbox_rows_for,
    query,
    raw_store,
    spool_files,
    storescu,
    temp_files,
)
from tests.small_disk import fill, mounted_tmpfs

STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000


def assert_nothing_kept(node: EdgeNode) -> None:
    assert spool_files(node) == []
    assert temp_files(node) == []
    assert query(node, "select count(*) from instance") == [(0,)]
    assert query(node, "select count(*) from outbox") == [(0,)]
    assert node.studies() == []


# --- who may talk to the node -------------------------------------------------------


def test_unknown_calling_ae_is_rejected_at_association(node_factory: Any, tmp_path: Path) -> None:
    node = node_factory(dicom={"allowed_calling_aets": ["DR1"]}).start()
    make_dx(tmp_path / "a.dcm", rows=256, cols=256)

    result = storescu(node, tmp_path / "a.dcm", calling="INTRUDER")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Association Rejected" in output
    assert "Calling AE Title Not Recognized" in output
    assert_nothing_kept(node)

    refused_echo = echo(node, calling="INTRUDER")
    assert refused_echo.returncode != 0
    assert "Calling AE Title Not Recognized" in refused_echo.stdout + refused_echo.stderr
    assert echo_succeeds(node)  # the allowed DR still gets through


def test_wrong_called_ae_title_is_rejected(node: EdgeNode, tmp_path: Path) -> None:
    make_dx(tmp_path / "a.dcm", rows=256, cols=256)
    result = storescu(node, tmp_path / "a.dcm", called="NOTEDGE")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Association Rejected" in output
    assert "Called AE Title Not Recognized" in output
    assert_nothing_kept(node)


# --- datasets the node cannot keep --------------------------------------------------


def test_dataset_without_sop_instance_uid_is_refused_with_a900(node: EdgeNode, tmp_path: Path) -> None:
    # DCMTK's storescu will not send such a file at all, so a raw sender stands in for a
    # broken modality; the point is the node's answer.
    make_dx(tmp_path / "no-sop.dcm", rows=256, cols=256, omit=("SOPInstanceUID",))
    status, comment = raw_store(node, tmp_path / "no-sop.dcm", DX_STORAGE)
    assert status == STATUS_DATASET_MISMATCH
    assert comment == "dataset has no SOPInstanceUID"
    assert_nothing_kept(node)
    assert echo_succeeds(node)


def test_dataset_without_study_instance_uid_is_refused_with_a900(node: EdgeNode, tmp_path: Path) -> None:
    make_dx(tmp_path / "no-study.dcm", rows=256, cols=256, omit=("StudyInstanceUID",))
    result = storescu(node, tmp_path / "no-study.dcm")
    output = result.stdout + result.stderr
    assert "Received Store Response (Error: DataSetDoesNotMatchSOPClass)" in output
    assert "Received Store Response (Success)" not in output
    assert_nothing_kept(node)

    status, comment = raw_store(node, tmp_path / "no-study.dcm", DX_STORAGE)
    assert (status, comment) == (STATUS_DATASET_MISMATCH, "dataset has no StudyInstanceUID")
    assert_nothing_kept(node)


def _truncated(source: bytes) -> bytes:
    return source[: len(source) // 2]  # cut inside the pixel data


def _garbage_after(source: bytes) -> bytes:
    return source + random.Random(7).randbytes(4000)


def _garbage_for_pixels(source: bytes) -> bytes:
    # The identifying header is intact; everything from the pixel data on is noise.
    cut = source.index(b"\xe0\x7f\x10\x00")
    return source[:cut] + random.Random(8).randbytes(len(source) - cut)


@pytest.mark.parametrize("damage", [_truncated, _garbage_after, _garbage_for_pixels], ids=["truncated", "garbage-after", "garbage-pixels"])
def test_malformed_dataset_is_refused_and_node_stays_up(node: EdgeNode, tmp_path: Path, damage: Any) -> None:
    good = tmp_path / "good.dcm"
    make_dx(good, rows=256, cols=256)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(damage(good.read_bytes()))

    status, comment = raw_store(node, bad, DX_STORAGE)
    assert status == STATUS_CANNOT_UNDERSTAND, f"0x{status:04X} {comment}"
    assert "malformed" in comment or "truncated" in comment
    assert_nothing_kept(node)
    assert echo_succeeds(node)
    assert node.proc is not None and node.proc.poll() is None


def test_unsupported_sop_class_is_refused_at_negotiation(node: EdgeNode, tmp_path: Path) -> None:
    private = tmp_path / "private.dcm"
    ds = make_dx(private, rows=256, cols=256)
    ds.SOPClassUID = "1.2.3.4.5.6"
    ds.file_meta.MediaStorageSOPClassUID = "1.2.3.4.5.6"
    ds.save_as(private, enforce_file_format=True)

    result = storescu(node, private)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "No presentation context for: (unknown SOP class) 1.2.3.4.5.6" in output, output
    assert "Received Store Response (Success)" not in output
    assert_nothing_kept(node)
    assert echo_succeeds(node)


def test_duplicate_instance_is_acknowledged_twice_and_kept_once(node: EdgeNode, tmp_path: Path) -> None:
    ds = make_dx(tmp_path / "a.dcm", rows=256, cols=256)
    for _ in range(2):
        result = storescu(node, tmp_path / "a.dcm")
        assert result.returncode == 0, result.stderr
        assert "Received Store Response (Success)" in result.stdout + result.stderr
    # And a third time within one association, as a DR re-sending its whole queue does.
    result = storescu(node, tmp_path / "a.dcm", tmp_path / "a.dcm")
    assert (result.stdout + result.stderr).count("Received Store Response (Success)") == 2

    assert len(spool_files(node)) == 1
    assert outbox_rows_for(node, ds.SOPInstanceUID) == 1
    assert [s["instances"] for s in node.studies()] == [1]
    assert node.status()["outbox"]["depth"] == 1
    assert temp_files(node) == []


# --- a full disk --------------------------------------------------------------------


def test_disk_below_minimum_answers_out_of_resources_and_healthz_503(node_factory: Any, tmp_path: Path) -> None:
    free_mb = shutil.disk_usage(tmp_path).free // 2**20
    node = node_factory(command=("run",), storage={"min_free_mb": int(free_mb) + 100_000}).start()
    make_dx(tmp_path / "a.dcm", rows=256, cols=256)

    result = storescu(node, tmp_path / "a.dcm")
    output = result.stdout + result.stderr
    assert "Received Store Response (Refused: OutOfResources)" in output, output
    assert "Received Store Response (Success)" not in output
    assert_nothing_kept(node)
    assert echo_succeeds(node)

    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{node.console_port}/healthz", timeout=10)
    assert err.value.code == 503
    health = json.load(err.value)
    assert health["status"] == "failing"
    assert health["checks"]["disk"]["ok"] is False
    assert "C-STORE answers Out of Resources" in health["checks"]["disk"]["detail"]
    assert node.status()["disk"]["ok"] is False
    assert node.stop() == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 40 MB filesystem for the data dir."""
    with mounted_tmpfs(tmp_path / "small" / "var", 40) as mount:
        yield mount


def test_truly_full_disk_answers_out_of_resources_and_keeps_nothing_half(node_factory: Any, small_disk: Path, tmp_path: Path) -> None:
    node = node_factory(subdir="small").start()
    assert node.data_dir == small_disk
    first = make_dx(tmp_path / "first.dcm", rows=256, cols=256)
    assert "Received Store Response (Success)" in storescu(node, tmp_path / "first.dcm").stderr

    # Something else fills the disk (logs, a runaway process): 1 MB left, a 2 MB image comes.
    fill(small_disk, leave_mb=1)
    make_dx(tmp_path / "big.dcm", rows=1024, cols=1024)
    result = storescu(node, tmp_path / "big.dcm")
    output = result.stdout + result.stderr
    assert "Received Store Response (Success)" not in output
    assert "Received Store Response (Refused: OutOfResources)" in output, output  # 0xA700, not an abort

    assert node.proc is not None and node.proc.poll() is None
    assert echo_succeeds(node)
    assert temp_files(node) == []
    assert len(spool_files(node)) == 1
    assert [s["instances"] for s in node.studies()] == [1]
    assert outbox_rows_for(node, first.SOPInstanceUID) == 1
    assert "Traceback" not in node.log_text()


# --- broken PDUs on the DICOM port --------------------------------------------------

_ASSOCIATE_RQ_HEAD = struct.pack(">BBI", 0x01, 0x00, 205) + struct.pack(">HH", 1, 0) + b"EDGE".ljust(16) + b"DR1".ljust(16)


def _send_raw(port: int, payload: bytes, half_close: bool = False) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        if half_close:
            s.shutdown(socket.SHUT_WR)
            try:
                s.recv(1024)  # the node may answer with an A-ABORT or just close
            except OSError:
                pass


BROKEN_PDUS = {
    "garbage": random.Random(1).randbytes(300),
    "http-request": b"GET / HTTP/1.1\r\nHost: edge\r\n\r\n",
    "truncated-associate-rq": _ASSOCIATE_RQ_HEAD,  # announces 205 bytes, sends 36
    "huge-length": struct.pack(">BBI", 0x01, 0x00, 0xFFFFFFF0) + b"\x00" * 64,
    "unknown-pdu-type": struct.pack(">BBI", 0x09, 0x00, 4) + b"\x00" * 4,
    "zero-length-associate": struct.pack(">BBI", 0x01, 0x00, 0),
}


@pytest.mark.parametrize("name", list(BROKEN_PDUS))
def test_broken_pdu_leaves_node_answering_echo(node: EdgeNode, name: str) -> None:
    _send_raw(node.port, BROKEN_PDUS[name], half_close=True)
    _send_raw(node.port, BROKEN_PDUS[name])  # and closed without waiting
    assert echo_succeeds(node)
    assert node.proc is not None and node.proc.poll() is None


def test_many_broken_connections_at_once_leave_node_answering(node: EdgeNode, tmp_path: Path) -> None:
    payloads = list(BROKEN_PDUS.values()) * 4
    threads = [threading.Thread(target=_send_raw, args=(node.port, p, i % 2 == 0)) for i, p in enumerate(payloads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    # 24 broken connections against 8 association slots: each is dropped within the ACSE
    # timeout (10 s), so the DR's retry gets through well within a DR's retry interval.
    deadline = time.monotonic() + 15
    while not echo_succeeds(node):
        assert time.monotonic() < deadline, "node still refuses associations 15 s after broken connections closed"
        time.sleep(0.5)
    assert node.proc is not None and node.proc.poll() is None
    ds = make_dx(tmp_path / "after.dcm", rows=256, cols=256)
    result = storescu(node, tmp_path / "after.dcm")
    assert "Received Store Response (Success)" in result.stdout + result.stderr
    assert outbox_rows_for(node, ds.SOPInstanceUID) == 1
