"""What the node takes as a DICOM UID: digits and dots, at most 64 characters (PS3.5 9.1).

Looser than pydicom's ``UID.is_valid`` on purpose: modalities in the field send components
with leading zeros, and the node keeps their images. Strict enough that a UID is safe as a
file name (no slash, no ``..``, no newline): the spool and the report folders are named by
UIDs a peer or the cloud chose.
"""

from __future__ import annotations

import re

UID_MAX_LENGTH = 64
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def is_uid(value: str) -> bool:
    """Whether ``value`` is a UID the node keeps and names files by."""
    return 0 < len(value) <= UID_MAX_LENGTH and _UID.fullmatch(value) is not None
