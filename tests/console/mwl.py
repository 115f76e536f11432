"""A worklist client that sends the identifier's bytes exactly as given (pynetdicom's DIMSE layer).

DCMTK findscu only sends datasets it could parse itself, and pynetdicom's ``send_c_find``
encodes a Dataset: neither can send the garbage, truncated or wrongly encoded identifiers a
hostile peer on the LAN can.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from io import BytesIO

from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]

from tests.conftest import EdgeNode


@dataclass
class FindResponse:
    status: int
    error_comment: str
    identifier: bytes  # a pending answer's encoded dataset; b"" for the final response


def raw_find(node: EdgeNode, identifier: bytes, calling: str = "DR", transfer_syntax: str = ImplicitVRLittleEndian,
             source: str = "127.0.0.1") -> list[FindResponse]:
    """One C-FIND with ``identifier`` as its bytes; every response until the final one."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(ModalityWorklistInformationFind, [transfer_syntax])
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title, bind_address=(source, 0))
    assert assoc.is_established, "the node refused the association"
    try:
        request = C_FIND()
        request.MessageID = 1
        request.AffectedSOPClassUID = ModalityWorklistInformationFind
        request.Priority = 2
        request.Identifier = BytesIO(identifier)
        # As send_c_echo does: pause the association's reactor so it does not take our responses.
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.001)
        try:
            assoc.dimse.send_msg(request, assoc.accepted_contexts[0].context_id)
            responses = []
            while True:
                _, rsp = assoc.dimse.get_msg(block=True)
                assert rsp is not None, "no C-FIND response within the DIMSE timeout"
                data = rsp.Identifier.getvalue() if rsp.Identifier is not None else b""
                responses.append(FindResponse(int(rsp.Status), str(getattr(rsp, "ErrorComment", "") or ""), data))
                if int(rsp.Status) not in (0xFF00, 0xFF01):
                    return responses
        finally:
            assoc._reactor_checkpoint.set()
    finally:
        assoc.release()
