"""The wire protocol (PROTOCOL.md): COBS frames with CRC-16/CCITT, and the messages in them.

Pure code, no I/O: the bridge, the software box and the firmware tool all frame and parse
through here, so the three cannot drift apart.
"""

from __future__ import annotations

import struct
from binascii import crc_hqx
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cobs import cobs

from firmware_bridge.const import (
    ACQUIRED_LEADS,
    MAX_FRAME,
    NEEDED_LEADS,
    PROTOCOL_MINOR,
    PROTOCOL_VERSION,
    Msg,
)

if TYPE_CHECKING:  # numpy where samples are unpacked: the console imports this module for the boxes' page
    import numpy as np

_HEADER = struct.Struct("<BBH")  # version, type, sequence
CRC_INIT = 0xFFFF  # CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF; check("123456789") = 0x29B1


class ProtocolError(ValueError):
    """A frame's payload does not parse as its message type."""


class LeadSetRefused(ProtocolError):
    """A well-formed HELLO whose lead set cannot make a 12-lead ECG: every recording would fail."""

    def __init__(self, hello: Hello, missing: tuple[str, ...]) -> None:
        super().__init__(f"HELLO: lead set lacks {', '.join(missing)} (a 12-lead ECG needs {', '.join(NEEDED_LEADS)})")
        self.hello = hello  # as the box sent it: the firmware tool may still update such a box
        self.box_id = hello.box_id
        self.missing = missing


def missing_leads(leads: tuple[str, ...]) -> tuple[str, ...]:
    """The leads a 12-lead ECG needs from the box that ``leads`` lacks (empty when it can make one)."""
    return tuple(lead for lead in NEEDED_LEADS if lead not in leads)


def lead_mask(leads: tuple[str, ...]) -> int:
    """Leads as a bitmask of their HELLO codes (bit 0 I, bit 1 II, bit 2 V1 …): the NAK's arg."""
    return sum(1 << ACQUIRED_LEADS.index(lead) for lead in set(leads) if lead in ACQUIRED_LEADS)


@dataclass(frozen=True)
class Frame:
    version: int
    type: int
    seq: int
    payload: bytes


def crc16(data: bytes) -> int:
    """CRC-16/CCITT as the box computes it (binascii's crc_hqx with init 0xFFFF)."""
    return crc_hqx(data, CRC_INIT)


def encode_frame(msg_type: int, seq: int, payload: bytes, version: int = PROTOCOL_VERSION) -> bytes:
    """One frame on the wire: 0x00, COBS(header + payload + CRC), 0x00.

    The leading delimiter costs a byte and makes noise on the idle line between frames a
    run of its own, discarded, instead of the start of the next frame.
    """
    body = _HEADER.pack(version, msg_type, seq & 0xFFFF) + payload
    return b"\x00" + cobs.encode(body + struct.pack("<H", crc16(body))) + b"\x00"


@dataclass
class DecoderStats:
    frames: int = 0
    crc_errors: int = 0
    garbage: int = 0  # runs between delimiters that are not COBS or too short/long
    bytes: int = 0


class FrameDecoder:
    """Splits a byte stream into frames; anything damaged is counted and skipped.

    Resync is free with COBS: the next 0x00 ends whatever came before, so one bad run of
    bytes costs at most the frame it hit.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.stats = DecoderStats()

    def feed(self, data: bytes) -> list[Frame | None]:
        """Frames completed by ``data``; None stands for one damaged frame (CRC or garbage)."""
        self.stats.bytes += len(data)
        self._buf += data
        out: list[Frame | None] = []
        while True:
            end = self._buf.find(0)
            if end < 0:
                if len(self._buf) > 2 * MAX_FRAME:  # no delimiter in sight: throw it away
                    self._buf.clear()
                    self.stats.garbage += 1
                    out.append(None)
                return out
            run = bytes(self._buf[:end])
            del self._buf[: end + 1]
            if run:
                out.append(self._decode(run))

    def reset(self) -> None:
        self._buf.clear()

    def _decode(self, run: bytes) -> Frame | None:
        try:
            body = cobs.decode(run)
        except cobs.DecodeError:
            self.stats.garbage += 1
            return None
        if len(body) < _HEADER.size + 2 or len(body) > MAX_FRAME:
            self.stats.garbage += 1
            return None
        if crc16(body[:-2]) != struct.unpack_from("<H", body, len(body) - 2)[0]:
            self.stats.crc_errors += 1
            return None
        version, msg_type, seq = _HEADER.unpack_from(body)
        self.stats.frames += 1
        return Frame(version, msg_type, seq, body[_HEADER.size : -2])


class SeqCounter:
    """Per-direction frame sequence numbers, 16 bits, wrapping."""

    def __init__(self) -> None:
        self.value = 0

    def next(self) -> int:
        self.value = (self.value + 1) & 0xFFFF
        return self.value


def seq_gap(previous: int | None, current: int) -> int:
    """How many frames were lost between two sequence numbers (0 when consecutive)."""
    if previous is None:
        return 0
    gap = (current - previous - 1) & 0xFFFF
    return gap if gap < 0x8000 else 0  # a repeat or reorder, not a loss


# --- messages ---------------------------------------------------------------------------------
# Each parse ignores trailing bytes: a newer minor version only ever appends fields.


MAX_NAME = 64  # characters in HELLO's box id, model and firmware version: DICOM LO's limit


def _str8(value: str) -> bytes:
    raw = value.encode("utf-8")[:255]
    return bytes([len(raw)]) + raw


def _read_str8(payload: bytes, pos: int) -> tuple[str, int]:
    if pos >= len(payload) or pos + 1 + payload[pos] > len(payload):
        raise ProtocolError("string runs past the end of the frame")
    n = payload[pos]
    return payload[pos + 1 : pos + 1 + n].decode("utf-8", "replace"), pos + 1 + n


def _unpack(fmt: struct.Struct, payload: bytes, what: str) -> tuple[int, ...]:
    if len(payload) < fmt.size:
        raise ProtocolError(f"{what}: {len(payload)} bytes, need {fmt.size}")
    return fmt.unpack_from(payload)


@dataclass(frozen=True)
class Hello:
    box_id: str
    model: str
    fw_version: str
    sample_rate: int
    nv_per_lsb: int  # nanovolts per LSB (2500 = 2.5 µV per LSB)
    leads: tuple[str, ...] = ACQUIRED_LEADS
    minor: int = PROTOCOL_MINOR

    _TAIL = struct.Struct("<HI")

    def pack(self) -> bytes:
        codes = bytes(ACQUIRED_LEADS.index(lead) for lead in self.leads)
        return (
            bytes([self.minor]) + _str8(self.box_id) + _str8(self.model) + _str8(self.fw_version)
            + bytes([len(codes)]) + codes + self._TAIL.pack(self.sample_rate, self.nv_per_lsb)
        )

    @classmethod
    def parse(cls, payload: bytes) -> Hello:
        """Refuses what the bridge could not use: every recording from such a box would fail later.

        Raises ``LeadSetRefused`` (a ``ProtocolError``) for a lead set without the leads a
        12-lead ECG needs; the strings go into logs and DICOM LO values, so control characters,
        a backslash in the box id (LO's value delimiter) or more than 64 characters are refused.
        """
        if not payload:
            raise ProtocolError("HELLO: empty")
        box_id, pos = _read_str8(payload, 1)
        model, pos = _read_str8(payload, pos)
        fw, pos = _read_str8(payload, pos)
        if pos >= len(payload):
            raise ProtocolError("HELLO: no lead set")
        n = payload[pos]
        codes = payload[pos + 1 : pos + 1 + n]
        if len(codes) != n or any(c >= len(ACQUIRED_LEADS) for c in codes):
            raise ProtocolError("HELLO: bad lead set")
        if len(set(codes)) != n:
            raise ProtocolError("HELLO: a lead is listed twice")
        rate, nv = _unpack(cls._TAIL, payload[pos + 1 + n :], "HELLO")
        if not box_id or rate <= 0 or nv <= 0:
            raise ProtocolError("HELLO: empty box id, sample rate or sensitivity")
        for what, value in (("box id", box_id), ("model", model), ("firmware version", fw)):
            if len(value) > MAX_NAME or not value.isprintable() or (what == "box id" and "\\" in value):
                raise ProtocolError(f"HELLO: {what} {value[:MAX_NAME]!r} is not a printable name of at most {MAX_NAME} characters")
        hello = cls(box_id, model, fw, rate, nv, tuple(ACQUIRED_LEADS[c] for c in codes), payload[0])
        missing = missing_leads(hello.leads)
        if missing:
            raise LeadSetRefused(hello, missing)
        return hello


@dataclass(frozen=True)
class Status:
    battery_pct: int
    flags: int
    lead_off: int  # bit per electrode, see const.ELECTRODES

    _S = struct.Struct("<BBH")

    def pack(self) -> bytes:
        return self._S.pack(self.battery_pct, self.flags, self.lead_off)

    @classmethod
    def parse(cls, payload: bytes) -> Status:
        return cls(*_unpack(cls._S, payload, "STATUS"))


@dataclass(frozen=True)
class Samples:
    rec_id: int
    first: int  # index of the first sample in the recording
    data: np.ndarray = field(compare=False)  # (n, leads) int16

    _S = struct.Struct("<IIBB")

    def pack(self) -> bytes:
        n, leads = self.data.shape
        return self._S.pack(self.rec_id, self.first, n, leads) + self.data.astype("<i2").tobytes()

    @classmethod
    def parse(cls, payload: bytes) -> Samples:
        rec_id, first, n, leads = _unpack(cls._S, payload, "SAMPLES")
        body = payload[cls._S.size : cls._S.size + 2 * n * leads]
        if len(body) != 2 * n * leads:
            raise ProtocolError("SAMPLES: short block")
        import numpy as np

        return cls(rec_id, first, np.frombuffer(body, dtype="<i2").reshape(n, leads))


@dataclass(frozen=True)
class RecStart:
    rec_id: int
    sample_rate: int
    expected: int  # samples per lead the box means to send

    _S = struct.Struct("<IHI")

    def pack(self) -> bytes:
        return self._S.pack(self.rec_id, self.sample_rate, self.expected)

    @classmethod
    def parse(cls, payload: bytes) -> RecStart:
        return cls(*_unpack(cls._S, payload, "REC_START"))


@dataclass(frozen=True)
class RecEnd:
    rec_id: int
    total: int  # samples per lead the box sent
    reason: int = 0  # 0 complete, 1 cancelled by the button

    _S = struct.Struct("<IIB")

    def pack(self) -> bytes:
        return self._S.pack(self.rec_id, self.total, self.reason)

    @classmethod
    def parse(cls, payload: bytes) -> RecEnd:
        return cls(*_unpack(cls._S, payload, "REC_END"))


@dataclass(frozen=True)
class Ack:
    ref_type: int
    ref_seq: int
    arg: int = 0  # rec_id for REC_END, offset for FW_CHUNK

    _S = struct.Struct("<BHI")

    def pack(self) -> bytes:
        return self._S.pack(self.ref_type, self.ref_seq, self.arg)

    @classmethod
    def parse(cls, payload: bytes) -> Ack:
        return cls(*_unpack(cls._S, payload, "ACK"))


@dataclass(frozen=True)
class NakMsg:
    ref_type: int
    ref_seq: int
    reason: int
    arg: int = 0

    _S = struct.Struct("<BHBI")

    def pack(self) -> bytes:
        return self._S.pack(self.ref_type, self.ref_seq, self.reason, self.arg)

    @classmethod
    def parse(cls, payload: bytes) -> NakMsg:
        return cls(*_unpack(cls._S, payload, "NAK"))


@dataclass(frozen=True)
class FwBegin:
    size: int
    sha256: bytes

    _S = struct.Struct("<I32s")

    def pack(self) -> bytes:
        return self._S.pack(self.size, self.sha256)

    @classmethod
    def parse(cls, payload: bytes) -> FwBegin:
        size, digest = _unpack(cls._S, payload, "FW_BEGIN")
        return cls(size, digest)  # type: ignore[arg-type]


@dataclass(frozen=True)
class FwChunk:
    offset: int
    data: bytes

    _S = struct.Struct("<IH")

    def pack(self) -> bytes:
        return self._S.pack(self.offset, len(self.data)) + self.data

    @classmethod
    def parse(cls, payload: bytes) -> FwChunk:
        offset, n = _unpack(cls._S, payload, "FW_CHUNK")
        data = payload[cls._S.size : cls._S.size + n]
        if len(data) != n:
            raise ProtocolError("FW_CHUNK: short chunk")
        return cls(offset, data)


def host_hello() -> bytes:
    """HOST_HELLO payload: the bridge's minor version; the box answers with HELLO."""
    return bytes([PROTOCOL_MINOR])


PARSERS = {
    Msg.HELLO: Hello.parse,
    Msg.STATUS: Status.parse,
    Msg.SAMPLES: Samples.parse,
    Msg.REC_START: RecStart.parse,
    Msg.REC_END: RecEnd.parse,
    Msg.ACK: Ack.parse,
    Msg.NAK: NakMsg.parse,
    Msg.FW_BEGIN: FwBegin.parse,
    Msg.FW_CHUNK: FwChunk.parse,
}


def parse(frame: Frame) -> object:
    """The message in a frame (bytes payload for types without fields); raises ProtocolError."""
    try:
        kind = Msg(frame.type)
    except ValueError:
        raise ProtocolError(f"unknown message type 0x{frame.type:02x}") from None
    parser = PARSERS.get(kind)
    return parser(frame.payload) if parser else frame.payload
