"""Pending C-FIND responses on the fast path are the bytes pynetdicom itself would send.

``edge.dicom.find_responses`` encodes a pending response's command set once per query and
packs command and identifier into one P-DATA PDU. These tests hold it to pynetdicom's own
encoder (same PDV payloads) and decoder (the peer reads the same message back).
"""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dimse_messages import C_FIND_RSP, DIMSEMessage
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import decode, encode

from edge.dicom.find_responses import _command_set_bytes, p_data_units

MWL_FIND = "1.2.840.10008.5.1.4.31"


def _pending(message_id: int, patient_id: str) -> tuple[C_FIND, bytes]:
    ds = Dataset()
    ds.PatientID = patient_id
    ds.PatientName = "Dlamini^Thandi"
    ds.AccessionNumber = "CLINC0042-000001"
    identifier = bytes(encode(ds, True, True))
    rsp = C_FIND()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = MWL_FIND
    rsp.Status = 0xFF00
    rsp.Identifier = BytesIO(identifier)
    return rsp, identifier


def _pdvs(units: list) -> list[tuple[int, bytes]]:
    return [(cx, bytes(data)) for unit in units for cx, data in unit.presentation_data_value_list]


@pytest.mark.parametrize("max_pdu", [0, 16384, 64])
def test_fast_path_sends_the_pdvs_pynetdicom_would(max_pdu: int) -> None:
    rsp, identifier = _pending(7, "8001015009087")
    message = C_FIND_RSP()
    message.primitive_to_message(rsp)
    theirs = _pdvs(list(message.encode_msg(3, max_pdu)))

    ours_units = p_data_units(3, _command_set_bytes(rsp), identifier, max_pdu)
    assert _pdvs(ours_units) == theirs
    if max_pdu == 64:  # too small for one PDU: fragmented exactly as pynetdicom does, one PDV per PDU
        assert len(ours_units) == len(theirs) > 2
    else:  # command and identifier travel in one PDU
        assert len(ours_units) == 1


@pytest.mark.parametrize("max_pdu", [16384, 64])
def test_peer_decodes_the_fast_path_response(max_pdu: int) -> None:
    rsp, identifier = _pending(9, "F-1234")
    received = DIMSEMessage()
    units = p_data_units(1, _command_set_bytes(rsp), identifier, max_pdu)
    done = [received.decode_msg(unit) for unit in units]
    assert done[-1] is True and not any(done[:-1])  # complete exactly at the last PDU
    primitive = received.message_to_primitive()
    assert isinstance(primitive, C_FIND)
    assert primitive.MessageIDBeingRespondedTo == 9
    assert primitive.Status == 0xFF00
    assert primitive.AffectedSOPClassUID == MWL_FIND
    answer = decode(primitive.Identifier, True, True)
    assert answer.PatientID == "F-1234" and str(answer.PatientName) == "Dlamini^Thandi"


def test_command_set_names_the_query_it_answers() -> None:
    first = _command_set_bytes(_pending(1, "A")[0])
    second = _command_set_bytes(_pending(2, "A")[0])
    assert first != second  # the message id is in the command set: the cache must key on it
    assert _command_set_bytes(_pending(1, "B")[0]) == first  # the identifier is not
