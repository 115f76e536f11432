"""The DR's worklist, asked the way a DR asks: DCMTK ``findscu -W`` against the node's MWL SCP."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]

from tests.conftest import EdgeNode
from tests.console.conftest import ADMIN, ADMIN_PASSWORD
from tests.console.helpers import ConsoleClient, find_answers, findscu
from tests.edge.helpers import echo_succeeds

SPS = "ScheduledProcedureStepSequence[0]"
TODAY = dt.date.today().strftime("%Y%m%d")
RETURN_KEYS = (
    "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyInstanceUID",
    "RequestedProcedureDescription", "RequestedProcedureID",
    f"{SPS}.ScheduledStationAETitle", f"{SPS}.ScheduledProcedureStepStartTime",
    f"{SPS}.ScheduledProcedureStepDescription", f"{SPS}.ScheduledProcedureStepID",
)


def _registered(cnode: EdgeNode) -> ConsoleClient:
    client = ConsoleClient(cnode)
    assert client.login(ADMIN, ADMIN_PASSWORD) == 303
    client.register(surname="Dlamini", given_names="Thandi", sex="F", id_number="8001015009087")
    client.register(surname="Nkosi", given_names="Sipho", sex="M", folder_number="F-1234", birth_date="1975-03-02",
                    exam="Knee X-ray")
    client.register(surname="Mokoena", given_names="Lerato", sex="F", folder_number="F-77", birth_date="1990-07-15",
                    exam="ECG")
    return client


def test_registered_patient_is_on_the_worklist_with_what_the_dr_needs(cnode: EdgeNode) -> None:
    _registered(cnode)
    result = findscu(cnode, f"{SPS}.Modality=DX", f"{SPS}.ScheduledProcedureStepStartDate={TODAY}",
                     "PatientID=8001015009087", *RETURN_KEYS)
    assert result.returncode == 0, result.stdout + result.stderr
    answers = find_answers(cnode)
    assert len(answers) == 1
    ds = answers[0]
    assert str(ds.PatientName) == "Dlamini^Thandi"
    assert ds.PatientID == "8001015009087"
    assert ds.PatientBirthDate == "19800101"  # taken from the ID number
    assert ds.PatientSex == "F"
    assert ds.AccessionNumber == "CLINC0042-000001" and len(ds.AccessionNumber) <= 16
    assert ds.RequestedProcedureDescription == "Chest X-ray"
    assert ds.RequestedProcedureID == ds.AccessionNumber
    assert ds.StudyInstanceUID.startswith("1.2.")
    step = ds.ScheduledProcedureStepSequence[0]
    assert step.Modality == "DX"
    assert step.ScheduledStationAETitle == "DR"
    assert step.ScheduledProcedureStepStartDate == TODAY
    assert step.ScheduledProcedureStepID == ds.AccessionNumber
    assert step.ScheduledProcedureStepDescription == "Chest X-ray"
    assert "edge.dicom.service: worklist query from DR answered with 1 item(s)" in cnode.log_text()
    assert "Dlamini" not in cnode.log_text() and "Thandi" not in cnode.log_text()  # no patient names in logs


def test_worklist_filters_on_date_modality_and_station(cnode: EdgeNode) -> None:
    _registered(cnode)
    yesterday = (dt.date.today() - dt.timedelta(days=1)).strftime("%Y%m%d")
    tomorrow = (dt.date.today() + dt.timedelta(days=1)).strftime("%Y%m%d")

    def ids(*keys: str) -> list[str]:
        result = findscu(cnode, "PatientID", *keys)
        assert result.returncode == 0 and "Success" in result.stdout + result.stderr, result.stdout + result.stderr
        return sorted(str(ds.PatientID) for ds in find_answers(cnode))

    assert ids(f"{SPS}.Modality=DX") == ["8001015009087", "F-1234"]
    assert ids(f"{SPS}.Modality=ECG") == ["F-77"]
    assert ids(f"{SPS}.Modality=CR") == []
    assert ids(f"{SPS}.ScheduledProcedureStepStartDate={yesterday}") == []
    assert ids(f"{SPS}.ScheduledProcedureStepStartDate={yesterday}-{tomorrow}") == ["8001015009087", "F-1234", "F-77"]
    assert ids(f"{SPS}.ScheduledProcedureStepStartDate={tomorrow}-") == []
    assert ids(f"{SPS}.ScheduledProcedureStepStartDate=-{TODAY}", f"{SPS}.Modality=DX") == ["8001015009087", "F-1234"]
    assert ids(f"{SPS}.ScheduledStationAETitle=DR") == ["8001015009087", "F-1234"]  # ECG has no DR station
    assert ids(f"{SPS}.ScheduledStationAETitle=OTHERDR") == []
    assert ids("PatientName=nkosi*") == ["F-1234"]  # wildcard, case-insensitive on names


def test_malformed_worklist_query_gets_a_clean_failure_and_the_node_stays_up(cnode: EdgeNode) -> None:
    _registered(cnode)
    bad_date = findscu(cnode, f"{SPS}.ScheduledProcedureStepStartDate=20261399")
    out = bad_date.stdout + bad_date.stderr
    assert "Error: DataSetDoesNotMatchSOPClass" in out, out  # 0xA900
    two_steps = findscu(cnode, f"{SPS}.Modality=DX", "ScheduledProcedureStepSequence[1].Modality=CR")
    assert "DataSetDoesNotMatchSOPClass" in two_steps.stdout + two_steps.stderr
    not_a_date = findscu(cnode, f"{SPS}.ScheduledProcedureStepStartDate=today")
    assert "DataSetDoesNotMatchSOPClass" in not_a_date.stdout + not_a_date.stderr
    assert echo_succeeds(cnode)
    good = findscu(cnode, f"{SPS}.Modality=DX")
    assert good.returncode == 0 and len(find_answers(cnode)) == 2
    assert "Traceback" not in cnode.log_text()
    assert "worklist query from DR (127.0.0.1) refused (status 0xA900)" in cnode.log_text()


def test_two_queries_on_one_association_each_get_their_own_answers(cnode: EdgeNode) -> None:
    """A DR that keeps its association open: every answer names the query it belongs to."""
    _registered(cnode)
    seen: list[tuple[int, int]] = []  # (message id responded to, status) of every C-FIND-RSP, as received

    def on_received(event: Any) -> None:
        command = event.message.command_set
        if command.CommandField == 0x8020:
            seen.append((int(command.MessageIDBeingRespondedTo), int(command.Status)))

    ae = AE(ae_title="DR")
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", cnode.port, ae_title=cnode.ae_title,
                         evt_handlers=[(evt.EVT_DIMSE_RECV, on_received)])
    assert assoc.is_established
    try:
        def ask(modality: str, message_id: int) -> list[str]:
            query = Dataset()
            query.PatientID = ""
            step = Dataset()
            step.Modality = modality
            query.ScheduledProcedureStepSequence = [step]
            answers = list(assoc.send_c_find(query, ModalityWorklistInformationFind, msg_id=message_id))
            assert [int(status.Status) for status, _ in answers][-1] == 0x0000
            return sorted(str(ds.PatientID) for status, ds in answers if int(status.Status) == 0xFF00)

        assert ask("DX", 7) == ["8001015009087", "F-1234"]
        assert ask("ECG", 8) == ["F-77"]
        assert ask("DX", 9) == ["8001015009087", "F-1234"]
    finally:
        assoc.release()
    assert seen == [(7, 0xFF00), (7, 0xFF00), (7, 0), (8, 0xFF00), (8, 0), (9, 0xFF00), (9, 0xFF00), (9, 0)]
