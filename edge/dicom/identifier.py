"""A C-FIND identifier read strictly, before pydicom reads it leniently.

pydicom is built to open whatever file a scanner wrote: an element whose length runs past
the end is cut short, a wrong VR is guessed around, trailing bytes are dropped, all with a
warning at most. For a query that leniency is a leak: random bytes decode to a dataset of
one unknown element, none of the worklist's keys is present, and "no keys" reads as "all
of today". pydicom's strict mode is a process-wide switch that C-STORE must not share, so
the identifier's encoding is walked here first: every element ends inside its parent, tags
ascend and are known (or properly private), the VR is the dictionary's, lengths are even,
nesting is shallow. The walk is linear in the bytes and touches no values.
"""

from __future__ import annotations

import struct
import zlib
from io import BytesIO

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode

MAX_IDENTIFIER_BYTES = 64 * 1024  # a real query is under 2 KiB; also the cap on a deflated one, inflated
MAX_DEPTH = 4  # identifier > sequence > item > sequence > item: a worklist query nests two deep
MAX_ELEMENTS = 1000  # a real query has a few dozen keys
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
# Explicit VR: these have two reserved bytes and a 4-byte length (PS3.5 7.1.2).
LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
SHORT_VRS = frozenset({"AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "PN", "SH", "SL",
                       "SS", "ST", "TM", "UI", "UL", "US"})


class MalformedIdentifier(ValueError):
    """The identifier's bytes are not a DICOM dataset; the message says where (never a value)."""


class _Walk:
    def __init__(self, data: bytes, implicit_vr: bool, little_endian: bool) -> None:
        self.data = data
        self.implicit = implicit_vr
        self.endian = "<" if little_endian else ">"
        self.count = 0

    def _unpack(self, fmt: str, pos: int, end: int, what: str) -> tuple[int, ...]:
        size = struct.calcsize(self.endian + fmt)
        if pos + size > end:
            raise MalformedIdentifier(f"{what} cut short at byte {pos}")
        return struct.unpack_from(self.endian + fmt, self.data, pos)

    def dataset(self, pos: int, end: int, depth: int, until_item_end: bool = False) -> int:
        """Walk one dataset from ``pos``; return where it ends (after its Item Delimiter, if any)."""
        previous = -1
        creators: set[tuple[int, int]] = set()  # (group, block) of the private creators seen
        while pos < end:
            group, elem = self._unpack("HH", pos, end, "element tag")
            tag = group << 16 | elem
            if tag == ITEM_END and until_item_end:
                self._unpack("L", pos + 4, end, "item delimiter")
                return pos + 8
            self.count += 1
            if self.count > MAX_ELEMENTS:
                raise MalformedIdentifier(f"more than {MAX_ELEMENTS} elements")
            if tag <= previous:
                raise MalformedIdentifier(f"({group:04X},{elem:04X}) out of order or repeated")
            previous = tag
            vr, length, pos = self._header(pos, end, group, elem)
            self._check_tag(group, elem, vr, creators)
            if vr == "SQ" or (length == UNDEFINED and vr in ("UN", None)):
                pos = self.sequence(pos, end, length, depth + 1, f"({group:04X},{elem:04X})")
                continue
            if length == UNDEFINED:
                raise MalformedIdentifier(f"({group:04X},{elem:04X}) has an undefined length but is not a sequence")
            if length % 2:
                raise MalformedIdentifier(f"({group:04X},{elem:04X}) has an odd length")
            if pos + length > end:
                raise MalformedIdentifier(f"({group:04X},{elem:04X}) runs past the end of its dataset")
            if group & 1 and 0x10 <= elem <= 0xFF:
                creators.add((group, elem))
            pos += length
        if until_item_end:
            raise MalformedIdentifier("an item has no delimiter")
        return pos

    def _header(self, pos: int, end: int, group: int, elem: int) -> tuple[str | None, int, int]:
        if self.implicit:
            (length,) = self._unpack("L", pos + 4, end, "element length")
            try:
                vr: str | None = dictionary_VR(group << 16 | elem)
            except KeyError:
                vr = None
            return ("SQ" if vr == "SQ" else vr), length, pos + 8
        if pos + 6 > end:
            raise MalformedIdentifier(f"element header cut short at byte {pos}")
        raw_vr = self.data[pos + 4:pos + 6]
        vr = raw_vr.decode("ascii", "replace")
        if vr in LONG_VRS:
            (length,) = self._unpack("L", pos + 8, end, "element length")
            return vr, length, pos + 12
        if vr in SHORT_VRS:
            (length,) = self._unpack("H", pos + 6, end, "element length")
            return vr, length, pos + 8
        raise MalformedIdentifier(f"({group:04X},{elem:04X}) has no valid VR")

    def _check_tag(self, group: int, elem: int, vr: str | None, creators: set[tuple[int, int]]) -> None:
        name = f"({group:04X},{elem:04X})"
        if group == 0xFFFE or group < 0x0008 or group == 0xFFFF:
            raise MalformedIdentifier(f"{name} does not belong in an identifier")
        if elem == 0x0000:  # group length: allowed, retired
            return
        if group & 1:  # private: a creator (gggg,0010-00FF), or an element of a creator seen before
            if elem < 0x10 or (elem > 0xFF and (group, elem >> 8) not in creators):
                raise MalformedIdentifier(f"{name} is private without a creator")
            return
        try:
            known = dictionary_VR(group << 16 | elem)
        except KeyError:
            raise MalformedIdentifier(f"{name} is not a DICOM attribute") from None
        if not self.implicit and vr != "UN" and vr not in known.split(" or "):
            raise MalformedIdentifier(f"{name} is sent as {vr}, not {known}")

    def sequence(self, pos: int, end: int, length: int, depth: int, name: str) -> int:
        if depth > MAX_DEPTH:
            raise MalformedIdentifier(f"{name}: sequences nested too deep")
        if length == UNDEFINED:
            stop, undefined = end, True
        else:
            if length % 2 or pos + length > end:
                raise MalformedIdentifier(f"{name} runs past the end of its dataset")
            stop, undefined = pos + length, False
        while pos < stop:
            tag_hi, tag_lo, item_length = self._unpack("HHL", pos, stop, f"{name} item")
            tag = tag_hi << 16 | tag_lo
            pos += 8
            if tag == SEQUENCE_END and undefined:
                return pos
            if tag != ITEM:
                raise MalformedIdentifier(f"{name} holds something that is not an item")
            if item_length == UNDEFINED:
                pos = self.dataset(pos, stop, depth, until_item_end=True)
            else:
                if pos + item_length > stop:
                    raise MalformedIdentifier(f"an item of {name} runs past the end")
                pos = self.dataset(pos, pos + item_length, depth) if item_length else pos
        if undefined:
            raise MalformedIdentifier(f"{name} has no sequence delimiter")
        return pos


def check_identifier(data: bytes, implicit_vr: bool, little_endian: bool) -> None:
    """Raise MalformedIdentifier unless ``data`` is a well-formed dataset in the given encoding."""
    walk = _Walk(data, implicit_vr, little_endian)
    end = walk.dataset(0, len(data), 0)
    if end != len(data):  # pragma: no cover - dataset() walks to the end or raises
        raise MalformedIdentifier("bytes left after the last element")


def _inflate(data: bytes) -> bytes:
    """Deflated Explicit VR Little Endian, inflated to at most MAX_IDENTIFIER_BYTES (a bomb stops there)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, MAX_IDENTIFIER_BYTES + 1)
    except zlib.error:
        raise MalformedIdentifier("the deflated identifier does not inflate") from None
    if len(out) > MAX_IDENTIFIER_BYTES or inflater.unconsumed_tail:
        raise MalformedIdentifier(f"the identifier inflates past {MAX_IDENTIFIER_BYTES} bytes")
    return out


def read_identifier(data: bytes, implicit_vr: bool, little_endian: bool, deflated: bool = False) -> Dataset:
    """The identifier as a pydicom Dataset, once its encoding has passed ``check_identifier``.

    Use this instead of ``event.identifier``: pynetdicom inflates a deflated identifier without a bound.
    """
    if len(data) > MAX_IDENTIFIER_BYTES:
        raise MalformedIdentifier(f"the identifier is larger than {MAX_IDENTIFIER_BYTES} bytes")
    if deflated:
        data, implicit_vr, little_endian = _inflate(data), False, True
    check_identifier(data, implicit_vr, little_endian)
    ds = decode(BytesIO(data), implicit_vr, little_endian)
    ds.set_original_encoding(implicit_vr, little_endian)
    return ds
