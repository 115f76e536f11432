"""Every failure status the node answers carries one Error Comment value the DR can show whole.

Error Comment is LO: a backslash splits it into values (the DR shows the first, or DCMTK
says "Non-conformant VM for ErrorComment"), 64 characters at most, no control characters.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filewriter import write_dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset

from edge.dicom.status import ERROR_COMMENT_MAX, error_comment, failure_status
from edge.dicom import worklist
from tests.conftest import EdgeNode
from tests.dicom_factory import DX_STORAGE, make_dx
from tests.edge.helpers import raw_store, storescu


def _as_the_dr_reads_it(ds: Dataset) -> object:
    """Encode as a C-STORE-RSP command set would (implicit VR LE) and decode again."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, ds)
    buffer.seek(0)
    return read_dataset(buffer, is_implicit_VR=True, is_little_endian=True).ErrorComment


@pytest.mark.parametrize("reason", [
    "StudyInstanceUID is not a valid UID: '1.2.3\\x01'",  # a repr of the sender's bytes
    "malformed identifier: PatientName 'A\\B' is multi-valued",
    "cannot parse D:\\dicom\\file.dcm\r\n\x1b[2J" + "x" * 100,
])
def test_a_failure_status_has_one_printable_error_comment(reason: str) -> None:
    for ds in (failure_status(0xC000, reason), worklist.failure(0xC000, reason)):
        comment = _as_the_dr_reads_it(ds)
        assert isinstance(comment, str), f"{comment!r} arrives as several values"
        assert "\\" not in comment and comment.isprintable() and comment.isascii()
        assert 0 < len(comment) <= ERROR_COMMENT_MAX
        assert comment == error_comment(reason)


def test_an_error_comment_keeps_what_it_can() -> None:
    assert error_comment("disk full on the edge node") == "disk full on the edge node"
    assert error_comment("a\\b") == "a/b"
    assert error_comment("tab\there") == "tabhere"
    assert error_comment("Nkosi\u00e9") == "Nkosi?"


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the file is meant to be bad
def test_a_refusal_quoting_the_senders_bytes_reaches_the_dr_as_one_comment(node: EdgeNode, tmp_path: Path) -> None:
    """The refusal quotes the bad UID with repr(): '1.2.3\\x01', a backslash the DR took as a value separator."""
    make_dx(tmp_path / "bad-uid.dcm", rows=16, cols=16, study_uid="1.2.3\x01")
    status, comment = raw_store(node, tmp_path / "bad-uid.dcm", DX_STORAGE)
    assert status == 0xA900
    assert comment.startswith("StudyInstanceUID is not a valid UID: '1.2.3"), comment
    assert "\\" not in comment and "[" not in comment  # one value, not pydicom's list of several
    result = storescu(node, tmp_path / "bad-uid.dcm")
    output = result.stdout + result.stderr
    assert "Non-conformant VM" not in output, output
