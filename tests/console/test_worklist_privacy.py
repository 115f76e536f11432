"""The worklist answers only the clinic's modalities, only the day's window, and says so in the audit.

Asked as someone on the clinic LAN would: DCMTK ``findscu -W`` with any AE title, from the
DR's address and from others (loopback 127.0.0.0/8 gives a test as many addresses as it
needs), and asked for a range reaching back years.
"""

from __future__ import annotations

import datetime as dt
import html
import re
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom.dsutils import encode

from tests.conftest import EdgeNode
from tests.console.conftest import ADMIN, ADMIN_PASSWORD, console_node
from tests.console.helpers import ConsoleClient, find_answers, findscu
from tests.console.mwl import raw_find

SPS = "ScheduledProcedureStepSequence[0]"
TODAY = dt.date.today()
PATIENT_KEYS = ("PatientName=*", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber")


def _register_two(node: EdgeNode) -> ConsoleClient:
    client = ConsoleClient(node)
    assert client.login(ADMIN, ADMIN_PASSWORD) == 303
    client.register(surname="Dlamini", given_names="Thandi", sex="F", id_number="8001015009087")
    client.register(surname="Nkosi", given_names="Sipho", sex="M", folder_number="F-1234", birth_date="1975-03-02")
    return client


def _audit_rows(client: ConsoleClient) -> list[list[str]]:
    """The console's audit page as the admin reads it: (user, action, detail, from) per worklist row."""
    status, page = client.get("/audit")
    assert status == 200
    rows = []
    for row in re.findall(r"<tr>(.*?)</tr>", page, re.S):
        cells = [html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", row, re.S)]
        if len(cells) == 6 and cells[2].startswith("worklist"):
            rows.append([cells[1], cells[2], cells[4], cells[5]])
    return rows


def _refused(result: Any) -> str:
    """What findscu shows for a refused query; asserts no patient data reached it."""
    out = result.stdout + result.stderr
    assert "DIMSE Status                  : 0xc000: Failed: Unable to process" in out, out  # findscu -d
    for leak in ("Dlamini", "Nkosi", "Thandi", "8001015009087", "F-1234", "19800101", "CLINC0042"):
        assert leak not in out, leak
    return out


def test_a_stranger_on_the_lan_gets_no_patients_the_dr_gets_the_list_and_both_are_audited(cnode: EdgeNode) -> None:
    client = _register_two(cnode)
    stranger = findscu(cnode, *PATIENT_KEYS, calling="ANYTHING", verbosity="-d")
    out = _refused(stranger)
    assert find_answers(cnode) == []
    assert "worklist: not one of this clinic's modalities" in out  # the Error Comment, as a DR shows it
    assert "worklist query from ANYTHING (127.0.0.1) refused (status 0xC000)" in cnode.log_text()

    dr = findscu(cnode, *PATIENT_KEYS)
    assert dr.returncode == 0 and len(find_answers(cnode)) == 2
    assert _audit_rows(client)[:2] == [  # newest first
        ["DR", "worklist", "answered 2 item(s)", "127.0.0.1"],
        ["ANYTHING", "worklist_refused", "refused (0xC000): AE title and address match no configured modality",
         "127.0.0.1"],
    ]


def test_the_drs_ae_title_from_another_address_is_refused(node_factory: Any) -> None:
    node = console_node(node_factory, dicom={"modality_ae": "DR", "modality_host": "127.0.0.2"})
    client = _register_two(node)
    result = findscu(node, *PATIENT_KEYS, calling="DR", verbosity="-d")  # findscu calls from 127.0.0.1
    assert "worklist: not one of this clinic's modalities" in _refused(result)
    assert find_answers(node) == []
    assert _audit_rows(client)[0][:2] == ["DR", "worklist_refused"] and _audit_rows(client)[0][3] == "127.0.0.1"


def test_a_second_modality_is_known_by_ae_title_and_address(node_factory: Any) -> None:
    """[dicom] other_modalities = ["CR1@127.0.0.3"]: CR1 from .3 reads the list; CR1 from .1 and DR from .3 do not."""
    node = console_node(node_factory, dicom={"modality_host": "127.0.0.1", "other_modalities": ["CR1@127.0.0.3"]})
    client = _register_two(node)
    query = Dataset()
    query.PatientName = "*"
    query.PatientID = ""
    identifier = encode(query, True, True)
    ok = raw_find(node, identifier, calling="CR1", source="127.0.0.3")
    assert [r.status for r in ok] == [0xFF00, 0xFF00, 0x0000]
    for calling, source in (("CR1", "127.0.0.1"), ("DR", "127.0.0.3")):
        refused = raw_find(node, identifier, calling=calling, source=source)
        assert [(r.status, r.error_comment, r.identifier) for r in refused] == [
            (0xC000, "worklist: not one of this clinic's modalities", b"")]
    rows = _audit_rows(client)
    assert [r[:2] + r[3:] for r in rows[:3]] == [
        ["DR", "worklist_refused", "127.0.0.3"], ["CR1", "worklist_refused", "127.0.0.1"],
        ["CR1", "worklist", "127.0.0.3"]]


def test_with_no_modality_configured_the_worklist_is_closed_and_says_how_to_open_it(node_factory: Any) -> None:
    """A first run: C-STORE works, the worklist answers nobody (not even an AE called DR) until a modality is set."""
    node = console_node(node_factory, dicom={"modality_host": ""})
    client = _register_two(node)
    result = findscu(node, *PATIENT_KEYS, calling="DR", verbosity="-d")
    assert "worklist closed: set [dicom] modality_host" in _refused(result)
    assert find_answers(node) == []
    assert "worklist query from DR (127.0.0.1) refused (status 0xC000): no modality is configured" in node.log_text()
    assert _audit_rows(client)[0] == ["DR", "worklist_refused", "refused (0xC000): no modality is configured",
                                      "127.0.0.1"]


def _order_on(node: EdgeNode, day: dt.date, patient_id: str) -> None:
    """An order scheduled on ``day`` (as if registered then), written into the running node's store."""
    from edge.orders.register import ExamChoice, Patient, create_order
    from edge.store.db import database, open_database

    open_database(node.data_dir, migrate=False)
    try:
        patient = Patient(f"PAST^{patient_id}", patient_id, "folder", "19800101", "F", ExamChoice("Chest X-ray", "DX"))
        create_order(patient, node_id="clinic-0042", station_ae="DR", by="test",
                     now=dt.datetime.combine(day, dt.time(9, 30)))
    finally:
        database.close()


def _ids(node: EdgeNode, *keys: str) -> list[str]:
    result = findscu(node, "PatientID", *keys)
    assert result.returncode == 0 and "Success" in result.stdout + result.stderr, result.stdout + result.stderr
    return sorted(str(ds.PatientID) for ds in find_answers(node))


DAYS = {n: TODAY + dt.timedelta(days=n) for n in (-30, -3, -1, 0, 1, 3)}


def _seed_days(node: EdgeNode) -> None:
    for n, day in DAYS.items():
        _order_on(node, day, f"D{n:+d}")


def test_an_open_date_range_reaches_today_only_by_default(node_factory: Any) -> None:
    node = console_node(node_factory)
    _seed_days(node)
    assert _ids(node) == ["D+0"]
    assert _ids(node, f"{SPS}.ScheduledProcedureStepStartDate=19000101-") == ["D+0"]
    assert _ids(node, f"{SPS}.ScheduledProcedureStepStartDate=-29991231") == ["D+0"]
    assert _ids(node, f"{SPS}.ScheduledProcedureStepStartDate={DAYS[-30]:%Y%m%d}") == []  # outside: nothing, no failure


def test_a_configured_window_reaches_a_few_days_either_side_and_no_further(node_factory: Any) -> None:
    node = console_node(node_factory, dicom={"modality_host": "127.0.0.1", "worklist_days_back": 1,
                                             "worklist_days_ahead": 3})
    _seed_days(node)
    assert _ids(node, f"{SPS}.ScheduledProcedureStepStartDate=19000101-") == ["D+0", "D+1", "D+3", "D-1"]
    assert _ids(node, f"{SPS}.ScheduledProcedureStepStartDate={DAYS[-3]:%Y%m%d}-{DAYS[0]:%Y%m%d}") == ["D+0", "D-1"]
    assert _ids(node) == ["D+0"]  # no date asked: the day's list, as before


def test_a_window_wider_than_a_week_stops_start_up_naming_the_key(tmp_path: Any) -> None:
    from tests.conftest import edge_cli, write_config

    config = write_config(tmp_path / "edge.toml", tmp_path / "var", dicom={"worklist_days_back": 30})
    result = edge_cli(config, "doctor", check=False)
    assert result.returncode != 0
    assert "worklist_days_back" in result.stdout + result.stderr and "Traceback" not in result.stderr


def test_a_refused_identifier_is_in_the_audit_with_its_reason(cnode: EdgeNode) -> None:
    client = _register_two(cnode)
    responses = raw_find(cnode, b"\x10\x00\x10\x00garbage", transfer_syntax=ImplicitVRLittleEndian)
    assert len(responses) == 1 and responses[0].status == 0xA900
    user, action, detail, source = _audit_rows(client)[0]
    assert (user, action, source) == ("DR", "worklist_refused", "127.0.0.1")
    assert detail.startswith("refused (0xA900): malformed identifier")
