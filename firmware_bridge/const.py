"""Names the bridge, the software box and the firmware tool share (see PROTOCOL.md)."""

from __future__ import annotations

from enum import IntEnum
from typing import Final

PROTOCOL_VERSION: Final = 1  # the version byte of every frame; a box speaking another is refused
PROTOCOL_MINOR: Final = 0  # in HELLO: new fields are only ever appended, old ones never change

MAX_FRAME: Final = 1024  # decoded bytes; a longer run without a delimiter is garbage
SAMPLES_PER_BLOCK: Final = 25  # per lead per SAMPLES frame: 50 ms at 500 Hz
FW_CHUNK: Final = 192  # firmware bytes per FW_CHUNK frame


class Msg(IntEnum):
    """Message types: 0x0_ box→bridge, 0x2_ bridge→box, 0x4_ firmware, 0x7_ both ways."""

    HELLO = 0x01
    STATUS = 0x02
    SAMPLES = 0x03
    REC_START = 0x04
    REC_END = 0x05
    HOST_HELLO = 0x20
    FW_BEGIN = 0x40
    FW_CHUNK = 0x41
    FW_END = 0x42
    FW_VERIFY = 0x43
    FW_COMMIT = 0x44
    FW_ROLLBACK = 0x45
    ACK = 0x70
    NAK = 0x71


class Nak(IntEnum):
    """Why a frame was refused (NAK reason byte)."""

    BAD_FRAME = 1  # CRC failed: the sender resends what it has outstanding
    UNSUPPORTED = 2  # never acceptable as sent (a HELLO whose lead set cannot make a 12-lead ECG): do not resend it
    BUSY = 3  # recording: no firmware update now
    BAD_STATE = 4  # e.g. FW_CHUNK without FW_BEGIN
    BAD_OFFSET = 5
    TOO_LARGE = 6
    HASH_MISMATCH = 7  # FW_VERIFY: the staged image's SHA-256 is not the announced one
    STORAGE = 8  # the bridge could not keep the recording: keep it and offer it again


# The eight leads a box acquires, by their code in HELLO's lead set.
ACQUIRED_LEADS: Final = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")

# Channel order in the DICOM waveform (the usual 12-lead order).
TWELVE_LEADS: Final = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")

# What ecg_dicom.twelve_leads derives (Einthoven, Goldberger) from I and II; every other
# lead of the twelve must come from the box, so a box's lead set must hold all of NEEDED_LEADS.
DERIVED_LEADS: Final = ("III", "aVR", "aVL", "aVF")
NEEDED_LEADS: Final = tuple(lead for lead in TWELVE_LEADS if lead not in DERIVED_LEADS)  # I, II, V1–V6

# SCP-ECG lead codes (DICOM CID 3001, coding scheme SCPECG 1.3).
SCPECG_LEADS: Final = {
    "I": ("5.6.3-9-1", "Lead I (Einthoven)"),
    "II": ("5.6.3-9-2", "Lead II"),
    "III": ("5.6.3-9-61", "Lead III"),
    "aVR": ("5.6.3-9-62", "Lead aVR"),
    "aVL": ("5.6.3-9-63", "Lead aVL"),
    "aVF": ("5.6.3-9-64", "Lead aVF"),
    "V1": ("5.6.3-9-3", "Lead V1"),
    "V2": ("5.6.3-9-4", "Lead V2"),
    "V3": ("5.6.3-9-5", "Lead V3"),
    "V4": ("5.6.3-9-6", "Lead V4"),
    "V5": ("5.6.3-9-7", "Lead V5"),
    "V6": ("5.6.3-9-8", "Lead V6"),
}

# Electrodes in STATUS's lead-off bitmask, bit 0 first.
ELECTRODES: Final = ("RA", "LA", "LL", "RL", "V1", "V2", "V3", "V4", "V5", "V6")

# STATUS flags.
FLAG_BUTTON: Final = 0x01
FLAG_RECORDING: Final = 0x02
FLAG_CHARGING: Final = 0x04

TWELVE_LEAD_ECG_SOP_CLASS: Final = "1.2.840.10008.5.1.4.1.1.9.1.1"
