"""DICOM status codes the node answers with (PS3.4 Annex B / C-STORE)."""

from __future__ import annotations

from typing import Final

STATUS_SUCCESS: Final = 0x0000
STATUS_OUT_OF_RESOURCES: Final = 0xA700
STATUS_DATASET_MISMATCH: Final = 0xA900
STATUS_CANNOT_UNDERSTAND: Final = 0xC000
STATUS_PROCESSING_FAILURE: Final = 0x0110

# Seconds a new connection has to complete its association (the ARTIM timer); a modality
# does it at once, and a broken or half-open connection must not hold an association slot.
ACSE_TIMEOUT_S: Final = 10.0

# Transfer syntaxes in the order we accept them when a modality offers several in one
# presentation context: lossless compressed first (smaller, nothing lost), then
# uncompressed, then lossy and video last so we never ask a modality to lose detail.
LOSSLESS_COMPRESSED: Final = (
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.57",  # JPEG lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.92",  # JPEG 2000 part 2 lossless
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K RPCL lossless
    "1.2.840.10008.1.2.4.110",  # JPEG XL lossless
    "1.2.840.10008.1.2.5",  # RLE lossless
)
UNCOMPRESSED: Final = (
    "1.2.840.10008.1.2.1",  # Explicit VR little endian
    "1.2.840.10008.1.2",  # Implicit VR little endian
    "1.2.840.10008.1.2.1.99",  # Deflated explicit VR little endian
    "1.2.840.10008.1.2.2",  # Explicit VR big endian (retired, still sent by old modalities)
)
# Referenced-pixel syntaxes carry no pixel data of their own: nothing to keep.
NOT_KEPT: Final = frozenset(
    {"1.2.840.10008.1.2.4.94", "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.204", "1.2.840.10008.1.2.4.205"}
)


def accepted_transfer_syntaxes(known: list[str]) -> list[str]:
    """Every transfer syntax pynetdicom knows, in our order of preference."""
    first = [ts for ts in (*LOSSLESS_COMPRESSED, *UNCOMPRESSED) if ts in known]
    rest = [ts for ts in known if ts not in first and ts not in NOT_KEPT]
    return first + rest

# The most of one received DIMSE message pynetdicom may assemble in memory. A command set is
# a few hundred bytes (the largest, a C-FIND-RQ's, well under 1 KiB); a data set held in
# memory is a C-FIND or C-ECHO identifier (the worklist reads at most 64 KiB of it,
# edge.dicom.identifier) or a message the node does not serve. A C-STORE's data set goes to
# a temp file instead, capped by [storage] max_instance_mb (edge.dicom.receive_file).
# Without a cap, fragments that never say "last" grew the node's memory without limit.
DIMSE_COMMAND_SET_MAX_BYTES: Final = 64 * 1024
DIMSE_DATA_SET_MAX_BYTES: Final = 1024 * 1024
# Received requests waiting for the association's thread to answer them. The node negotiates
# no asynchronous operations, so a peer must wait for each answer before its next request: a
# modality has one waiting at most. A peer streaming requests (and reading the answers) faster
# than they are answered queued them without limit: 100 MB of C-ECHO-RQs took 450 MB.
DIMSE_MESSAGES_WAITING_MAX: Final = 8
