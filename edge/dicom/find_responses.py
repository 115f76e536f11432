"""Pending C-FIND responses sent without rebuilding the same message 500 times.

A DR reading the day's worklist gets one C-FIND-RSP per scheduled item. pynetdicom
builds a new DIMSE message for each one: it fills a fresh command set, encodes it twice
(once to measure the group length, once to send), then queues the command and the
identifier as two P-DATA PDUs. That took about 0.7 ms per answer on the clinic box.
For one query, every pending response has the same command set. Only the identifier
changes, and the worklist has already encoded it (``worklist.EncodedAnswer``).

``install()`` puts two narrow fast paths into pynetdicom:

- the identifier encoder hands ``EncodedAnswer`` bytes over as they are;
- ``DIMSEServiceProvider.send_msg`` encodes a pending C-FIND-RSP command set once per
  query, with pynetdicom's own message code, and then reuses those bytes. The command
  and the identifier go as two PDVs in one P-DATA PDU when they fit in the peer's
  maximum PDU length (PS3.8 9.3.5 allows one or more PDVs in a P-DATA-TF).

Every other message, and any association with an ``EVT_DIMSE_SENT`` handler bound,
goes through pynetdicom unchanged. The worklist tests check the answers byte for byte
against DCMTK ``findscu`` on every run.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt, service_class
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_FIND_RSP, DIMSEMessage
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import P_DATA

from edge.dicom.worklist import EncodedAnswer

PENDING = frozenset({0xFF00, 0xFF01})

# PDV message control header (PS3.8 E.2): bit 0 command, bit 1 last fragment.
_COMMAND_MORE, _COMMAND_LAST, _DATA_MORE, _DATA_LAST = b"\x01", b"\x03", b"\x00", b"\x02"
_PDV_OVERHEAD = 6  # item length (4), context id (1), control header (1)

_encode = service_class.encode
_send_msg = DIMSEServiceProvider.send_msg


def _encode_identifier(ds: Dataset, *args: Any, **kwargs: Any) -> bytes | None:
    """pynetdicom's identifier encoder, passing pre-encoded worklist answers through."""
    if isinstance(ds, EncodedAnswer):
        return ds.encoded  # type: ignore[no-any-return]
    return _encode(ds, *args, **kwargs)


def _command_set_bytes(primitive: C_FIND) -> bytes:
    """The response's command set, encoded by pynetdicom's own message code."""
    message = C_FIND_RSP()
    message.primitive_to_message(primitive)
    return bytes(encode(message.command_set, True, True) or b"")


def _fragments(control_more: bytes, control_last: bytes, data: bytes, max_pdu: int) -> list[bytes]:
    pieces = list(DIMSEMessage._generate_pdv_fragments(data, max_pdu))
    return [control_more + piece for piece in pieces[:-1]] + [control_last + pieces[-1]]


def p_data_units(context_id: int, command: bytes, identifier: bytes, max_pdu: int) -> list[P_DATA]:
    """The P-DATA primitives for one response: a single PDU when command and identifier fit."""
    if max_pdu == 0 or len(command) + len(identifier) + 2 * _PDV_OVERHEAD <= max_pdu:
        pdata = P_DATA()
        # pynetdicom types the items as tuples but its setter accepts only [id, bytes] lists
        pdvs: list[Any] = [[context_id, _COMMAND_LAST + command], [context_id, _DATA_LAST + identifier]]
        pdata.presentation_data_value_list = pdvs
        return [pdata]
    units = []
    for pdv in (_fragments(_COMMAND_MORE, _COMMAND_LAST, command, max_pdu)
                + _fragments(_DATA_MORE, _DATA_LAST, identifier, max_pdu)):
        pdata = P_DATA()
        pdata.presentation_data_value_list = [[context_id, pdv]]  # type: ignore[list-item]
        units.append(pdata)
    return units


def _send_msg_reusing_command(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
    """``send_msg``, with the command set of pending C-FIND responses encoded once per query."""
    identifier = primitive.Identifier if isinstance(primitive, C_FIND) else None
    if (not isinstance(identifier, BytesIO) or primitive.MessageIDBeingRespondedTo is None
            or primitive.Status not in PENDING or self.assoc.get_handlers(evt.EVT_DIMSE_SENT)):
        _send_msg(self, primitive, context_id)
        return
    key = (primitive.MessageIDBeingRespondedTo, str(primitive.AffectedSOPClassUID), primitive.Status)
    cached = self.__dict__.get("_edge_pending_find_command")
    if cached is None or cached[0] != key:
        cached = (key, _command_set_bytes(primitive))
        self.__dict__["_edge_pending_find_command"] = cached
    for pdata in p_data_units(context_id, cached[1], identifier.getvalue(), self.maximum_pdu_size):
        self.dul.send_pdu(pdata)


def install() -> None:
    """Put both fast paths into pynetdicom (process-wide, idempotent)."""
    service_class.encode = _encode_identifier
    DIMSEServiceProvider.send_msg = _send_msg_reusing_command  # type: ignore[method-assign]
