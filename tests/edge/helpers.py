"""What a user or a test of the DICOM edge checks from outside the node process.

Real DCMTK tools for the DR's side, a raw pynetdicom sender only where DCMTK refuses to
send what we need to test (a dataset without SOP Instance UID, a broken dataset), and a
read-only look into the node's SQLite database.
"""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pynetdicom import AE, _config, build_context
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification

from tests.conftest import DCMTK, EdgeNode


def dcmtk(tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A DCMTK tool by full path; output decoded leniently (it may echo binary bytes)."""
    return subprocess.run(
        [str(DCMTK / tool), *args], capture_output=True, text=True, errors="replace", timeout=timeout
    )


def echo(node: EdgeNode, calling: str = "DR1", called: str | None = None) -> subprocess.CompletedProcess[str]:
    """DCMTK echoscu -v against the node; output in ``.stdout + .stderr``."""
    return dcmtk("echoscu", "-v", "-aet", calling, "-aec", called or node.ae_title, "127.0.0.1", str(node.port))


def echo_succeeds(node: EdgeNode) -> bool:
    result = echo(node)
    return result.returncode == 0 and "Received Echo Response (Success)" in result.stdout + result.stderr


def storescu(node: EdgeNode, *files: Path, calling: str = "DR1", called: str | None = None, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return dcmtk(
        "storescu", "-v", "-aet", calling, "-aec", called or node.ae_title, *extra,
        "127.0.0.1", str(node.port), *map(str, files), timeout=120,
    )


def raw_store(node: EdgeNode, path: Path, sop_class: str, transfer_syntax: str = "1.2.840.10008.1.2.1") -> tuple[int, str]:
    """Send a file's bytes as they are (pynetdicom, chunked): DCMTK would refuse to send it.

    Returns (status, error comment) as the node answered.
    """
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's dataset bytes unparsed
    try:
        ae = AE(ae_title="DR1")
        ae.add_requested_context(sop_class, transfer_syntax)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert assoc.is_established, "the node refused the association"
        try:
            status = assoc.send_c_store(path)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    assert "Status" in status, "no C-STORE response from the node"
    return int(status.Status), str(status.get("ErrorComment", ""))


@contextmanager
def read_only_db(node: EdgeNode) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(f"file:{node.data_dir / 'edge.db'}?mode=ro", uri=True, timeout=15)
    try:
        yield conn
    finally:
        conn.close()


def query(node: EdgeNode, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with read_only_db(node) as conn:
        return conn.execute(sql, params).fetchall()


def outbox_rows_for(node: EdgeNode, sop_instance_uid: str) -> int:
    sql = "select count(*) from outbox join instance on instance.id = outbox.instance_id where sop_instance_uid = ?"
    return int(query(node, sql, sop_instance_uid)[0][0])


def spool_files(node: EdgeNode) -> list[Path]:
    return sorted((node.data_dir / "spool").glob("*/*.dcm"))


def temp_files(node: EdgeNode) -> list[Path]:
    tmp = node.data_dir / "tmp"
    return sorted(p for p in tmp.rglob("*") if p.is_file()) if tmp.exists() else []


VERIFICATION = "1.2.840.10008.1.1"


def associate_rq(called: str = "EDGE", calling: str = "STRANGER", abstract_syntax: str = VERIFICATION,
                 transfer_syntaxes: list[str] | None = None) -> bytes:
    """A well-formed A-ASSOCIATE-RQ with one presentation context (id 1), as any DICOM tool would send."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    context = build_context(abstract_syntax, transfer_syntaxes)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.9999.1"
    primitive.user_information = [max_length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())
