"""A cheap, bounded walk over a Part 10 file: what it is and whether it is whole, without decoding it.

Everything the node reads from a peer (a C-STORE, a file already in the spool, a report
from the cloud) goes through :func:`walk_instance` before anything builds a pydicom
Dataset of it. The walk reads element headers and skips values, keeps the few top-level
values asked for, and counts: decoded bytes, elements (with sequence items, at any
depth) and, for the deflated transfer syntax, the inflation ratio. It inflates in
streaming fashion (``zlib.decompressobj`` with ``max_length``), so its memory is a few MB
whatever the file claims; over a limit it stops at once with :class:`OverLimit`.

Why not pydicom's reader: it inflates a deflated dataset whole into memory (a 0.5 MB
file became 512 MiB, then 1.1 GB of process), and it builds a Dataset of every element of
a sequence of undefined length while skipping over it.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID

if TYPE_CHECKING:
    from edge.config.sections import StorageSection

MiB: Final = 1 << 20
DEFLATED: Final = "1.2.840.10008.1.2.1.99"

# Below this much inflated output the ratio is not judged: a small header of empty
# values deflates very well and is no danger.
RATIO_FLOOR_BYTES: Final = 16 * MiB
MAX_DEPTH: Final = 64  # sequences nested deeper are no clinical object; stop rather than recurse
_MAX_KEPT_VALUE: Final = 1024  # a wanted value longer than this is not an identifier: left out
_MAX_META_ELEMENTS: Final = 64
_MAX_META_VALUE: Final = 64 * 1024
_INFLATE_INPUT: Final = 64 * 1024
_INFLATE_OUTPUT: Final = MiB
_DEFLATE_TRAILER: Final = 64

_ITEM: Final = 0xFFFEE000
_ITEM_END: Final = 0xFFFEE00D
_SEQUENCE_END: Final = 0xFFFEE0DD
_UNDEFINED: Final = 0xFFFFFFFF
_PIXEL_DATA: Final = 0x7FE00010
_LONG_VRS: Final = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})


@dataclass(frozen=True)
class DecodeLimits:
    """How much decoding one instance may cost; ``[storage]`` max_instance_mb, max_deflate_ratio, max_elements."""

    max_bytes: int = 512 * MiB
    max_deflate_ratio: float = 50.0
    max_elements: int = 200_000
    size_key: str = "[storage] max_instance_mb"  # the key to name when max_bytes is passed

    @classmethod
    def from_storage(cls, storage: StorageSection) -> DecodeLimits:
        return cls(storage.max_instance_mb * MiB, float(storage.max_deflate_ratio), storage.max_elements)

    def too_large(self) -> str:
        return f"larger than {self.max_bytes // MiB} MB ({self.size_key})"


class OverLimit(Exception):
    """Decoding would cost more than the limits allow; ``reason`` fits a DICOM Error Comment."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Malformed(Exception):
    """The file is not a whole, well-formed dataset; ``reason`` fits a DICOM Error Comment."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _PastEnd(Exception):
    """A value runs past the end of the data."""


@dataclass
class WalkedInstance:
    """What the walk learnt: the encoding, the cost of decoding it, and the wanted top-level values."""

    transfer_syntax: str
    dataset_offset: int  # where the dataset starts in the file
    file_bytes: int
    decoded_bytes: int  # the dataset's size once inflated (the file's dataset bytes otherwise)
    elements: int  # elements and sequence items, at every depth
    header: Dataset = field(default_factory=Dataset)  # only the wanted top-level elements, undecoded until read

    @property
    def deflated(self) -> bool:
        return self.transfer_syntax == DEFLATED


class _FileReader:
    """The dataset bytes of a file as they are; skipping is a seek, checked against the file's size."""

    def __init__(self, fp: BinaryIO, size: int) -> None:
        self._fp = fp
        self._size = size
        self.read = fp.read

    def tell(self) -> int:
        return self._fp.tell()

    def skip(self, n: int) -> None:
        target = self._fp.tell() + n
        if target > self._size:
            raise _PastEnd
        self._fp.seek(target)

    def finish(self) -> int:
        return self._size


class _Inflater:
    """A deflated dataset as a stream, inflated a chunk at a time and counted against the limits."""

    def __init__(self, fp: BinaryIO, limits: DecodeLimits) -> None:
        self._fp = fp
        self._limits = limits
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buffer = bytearray()
        self._pos = 0
        self._input = b""
        self._input_done = False
        self.consumed = 0  # compressed bytes fed to zlib
        self.produced = 0  # inflated bytes

    def _count(self, n: int) -> None:
        self.produced += n
        limits = self._limits
        if self.produced > limits.max_bytes:
            raise OverLimit(f"inflates past {limits.max_bytes // MiB} MB ({limits.size_key})")
        if self.produced > RATIO_FLOOR_BYTES and self.produced > limits.max_deflate_ratio * max(self.consumed, 1):
            raise OverLimit(f"inflates over {limits.max_deflate_ratio:g}x ([storage] max_deflate_ratio)")

    def _fill(self, want: int) -> None:
        """Make ``want`` bytes available past the read position, or as many as the stream holds."""
        if self._pos > _INFLATE_OUTPUT:
            del self._buffer[: self._pos]
            self._pos = 0
        while len(self._buffer) - self._pos < want and not self._z.eof:
            if not self._input and not self._input_done:
                self._input = self._fp.read(_INFLATE_INPUT)
                self._input_done = not self._input
            if self._input:
                fed = len(self._input)
                try:
                    chunk = self._z.decompress(self._input, _INFLATE_OUTPUT)
                except zlib.error as exc:
                    raise Malformed(f"malformed deflated data: {exc}") from None
                self._input = self._z.unconsumed_tail
                self.consumed += fed - len(self._input)
            else:
                try:
                    chunk = self._z.flush()
                except zlib.error as exc:
                    raise Malformed(f"malformed deflated data: {exc}") from None
                if not chunk:
                    break
            self._count(len(chunk))
            self._buffer += chunk

    def read(self, n: int) -> bytes:
        self._fill(n)
        data = bytes(self._buffer[self._pos : self._pos + n])
        self._pos += len(data)
        return data

    def tell(self) -> int:
        return self.produced - (len(self._buffer) - self._pos)

    def skip(self, n: int) -> None:
        while n > 0:
            step = min(n, _INFLATE_OUTPUT)
            self._fill(step)
            available = min(step, len(self._buffer) - self._pos)
            if available <= 0:
                raise _PastEnd
            self._pos += available
            n -= available

    def finish(self) -> int:
        """The whole dataset has been walked: the deflate stream must end here.

        A few bytes may follow it (DCMTK's pad byte to an even length, some writers' gzip
        trailer); more is garbage.
        """
        if not self._z.eof:
            raise Malformed("truncated dataset: the deflated data is cut short")
        trailing = len(self._z.unused_data) + len(self._input)
        while trailing <= _DEFLATE_TRAILER and (more := self._fp.read(_INFLATE_INPUT)):
            trailing += len(more)
        if trailing > _DEFLATE_TRAILER:
            raise Malformed("malformed dataset: garbage after the deflated data")
        return self.produced


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _is_sequence(tag: int) -> bool:
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False


class _Walk:
    """Element headers, depth first, counted; values skipped unless wanted at the top level."""

    def __init__(
        self, reader: _FileReader | _Inflater, little_endian: bool, limits: DecodeLimits, wanted: frozenset[int]
    ) -> None:
        self.r = reader
        self.little = little_endian
        self.limits = limits
        self.wanted = wanted
        self.elements = 0
        self.values: dict[BaseTag, DataElement | RawDataElement] = {}  # what Dataset() takes
        endian = "<" if little_endian else ">"
        self._tag_length = struct.Struct(endian + "HHL").unpack
        self._explicit = struct.Struct(endian + "HH2sH").unpack
        self._long = struct.Struct(endian + "L").unpack

    def _count(self) -> None:
        self.elements += 1
        if self.elements > self.limits.max_elements:
            raise OverLimit(f"over {self.limits.max_elements} elements ([storage] max_elements)")

    def _read(self, n: int) -> bytes:
        data = self.r.read(n)
        if len(data) < n:
            raise Malformed("truncated dataset: it ends inside an element")
        return data

    def dataset(self, end: int | None, depth: int, implicit: bool) -> None:
        """Walk a dataset up to ``end`` (defined-length item), its item delimiter (undefined), or the end of the data (top level)."""
        r = self.r
        top = depth == 0
        previous = -1
        while True:
            if end is not None:
                at = r.tell()
                if at == end:
                    return
                if at > end:
                    raise Malformed("malformed dataset: an element runs past the end of its item")
            head = r.read(8)
            if len(head) < 8:
                if top and not head:
                    return
                if top:
                    raise Malformed(f"malformed dataset: {len(head)} byte(s) of garbage after it")
                raise Malformed("truncated dataset: a sequence item is cut short")
            group, number, length = self._tag_length(head)
            tag = group << 16 | number
            if tag == _ITEM_END:
                if end is None and not top:
                    return
                raise Malformed("malformed dataset: an item delimiter outside an item")
            if group == 0xFFFE:
                raise Malformed(f"malformed dataset: {_tag_text(tag)} where an element belongs")
            self._count()
            if tag <= previous and top:
                raise Malformed(f"malformed dataset: element {_tag_text(tag)} out of order")
            previous = tag
            vr: bytes | None = None
            element_implicit = implicit
            if not implicit:
                vr = head[4:6]
                if vr in _LONG_VRS:
                    length = self._long(self._read(4))[0]
                elif 0x41 <= vr[0] <= 0x5A and 0x41 <= vr[1] <= 0x5A:
                    length = self._explicit(head)[3]
                else:  # some writers switch to implicit VR inside a sequence; pydicom reads it so too
                    vr, element_implicit = None, True
            if length == _UNDEFINED:
                self._undefined_length(tag, vr, depth, element_implicit)
            elif vr == b"SQ" or (vr is None and _is_sequence(tag)):
                self._sequence(r.tell() + length, depth, element_implicit)
            elif top and tag in self.wanted and length <= _MAX_KEPT_VALUE:
                at = r.tell()
                value = self._read(length)
                self.values[BaseTag(tag)] = RawDataElement(
                    BaseTag(tag), vr.decode("ascii") if vr else None, length, value, at, element_implicit, self.little
                )
            else:
                try:
                    r.skip(length)
                except _PastEnd:
                    raise Malformed(f"truncated dataset: element {_tag_text(tag)} runs past the end") from None

    def _undefined_length(self, tag: int, vr: bytes | None, depth: int, implicit: bool) -> None:
        if vr == b"UN":  # PS3.5 6.2.2: a sequence, encoded implicit VR little endian
            if not self.little:
                raise Malformed(f"malformed dataset: element {_tag_text(tag)} of undefined length")
            self._sequence(None, depth, True)
        elif vr == b"SQ" or (vr is None and tag != _PIXEL_DATA):
            self._sequence(None, depth, implicit)
        elif tag == _PIXEL_DATA or vr in (b"OB", b"OW"):
            self._fragments(tag)
        else:
            raise Malformed(f"malformed dataset: element {_tag_text(tag)} of undefined length")

    def _fragments(self, tag: int) -> None:
        """Encapsulated pixel data: items of defined length up to the sequence delimiter, skipped."""
        while True:
            group, number, length = self._tag_length(self._read(8))
            item_tag = group << 16 | number
            if item_tag == _SEQUENCE_END:
                return
            if item_tag != _ITEM or length == _UNDEFINED:
                raise Malformed(f"malformed dataset: bad fragment in {_tag_text(tag)}")
            self._count()
            try:
                self.r.skip(length)
            except _PastEnd:
                raise Malformed(f"truncated dataset: element {_tag_text(tag)} runs past the end") from None

    def _sequence(self, end: int | None, depth: int, implicit: bool) -> None:
        if depth + 1 > MAX_DEPTH:
            raise Malformed(f"malformed dataset: sequences nested over {MAX_DEPTH} deep")
        r = self.r
        while True:
            if end is not None:
                at = r.tell()
                if at == end:
                    return
                if at > end:
                    raise Malformed("malformed dataset: an item runs past the end of its sequence")
            group, number, length = self._tag_length(self._read(8))
            tag = group << 16 | number
            if tag == _SEQUENCE_END:
                if end is None:
                    return
                continue  # a stray delimiter in a sequence of defined length: nothing to walk
            if tag != _ITEM:
                raise Malformed(f"malformed dataset: {_tag_text(tag)} where a sequence item belongs")
            self._count()
            if length == _UNDEFINED:
                self.dataset(None, depth + 1, implicit)
            else:
                self.dataset(r.tell() + length, depth + 1, implicit)


def _read_meta(fp: BinaryIO) -> tuple[str, int]:
    """The transfer syntax from the file meta group, and where the dataset starts."""
    preamble = fp.read(132)
    if len(preamble) < 132 or preamble[128:132] != b"DICM":
        raise Malformed("cannot parse dataset: no DICOM file meta (no DICM prefix)")
    transfer_syntax = ""
    for _ in range(_MAX_META_ELEMENTS):
        at = fp.tell()
        head = fp.read(8)
        if len(head) < 8 or struct.unpack("<H", head[:2])[0] != 2:
            fp.seek(at)
            return transfer_syntax, at
        group, number, vr, length = struct.unpack("<HH2sH", head)
        if vr in _LONG_VRS:
            extra = fp.read(4)
            if len(extra) < 4:
                raise Malformed("truncated dataset: it ends inside the file meta")
            length = struct.unpack("<L", extra)[0]
        if length > _MAX_META_VALUE:
            raise Malformed("malformed file meta: a value is far too long")
        value = fp.read(length)
        if len(value) < length:
            raise Malformed("truncated dataset: it ends inside the file meta")
        if (group, number) == (0x0002, 0x0010):
            transfer_syntax = value.decode("ascii", "replace").strip("\0 ")
    raise Malformed("malformed file meta: too many elements")


def _encoding(transfer_syntax: str, first: bytes) -> tuple[bool, bool]:
    """(implicit VR, little endian) for a transfer syntax; every one not listed is explicit little endian."""
    if not transfer_syntax:  # no meta value: look at the first element's VR, as pydicom does
        vr = first[4:6]
        explicit = len(vr) == 2 and 0x41 <= vr[0] <= 0x5A and 0x41 <= vr[1] <= 0x5A
        return not explicit, True
    try:
        syntax = UID(transfer_syntax)
        return bool(syntax.is_implicit_VR), bool(syntax.is_little_endian)
    except ValueError:  # private or unknown transfer syntax
        return False, True


def walk_instance(path: Path, limits: DecodeLimits, wanted: frozenset[int] = frozenset()) -> WalkedInstance:
    """Walk the file's dataset within ``limits``; the ``wanted`` top-level tags come back in ``header``.

    Raises
    ------
    OverLimit
        decoding it would take more bytes, inflation or elements than ``limits`` allow.
    Malformed
        it is not a whole dataset: truncated, garbage after it, elements out of order, a
        broken sequence or deflate stream. Also raises OSError if it cannot be read.
    """
    with open(path, "rb") as fp:
        size = path.stat().st_size
        transfer_syntax, offset = _read_meta(fp)
        deflated = transfer_syntax == DEFLATED
        if not deflated and size - offset > limits.max_bytes:
            raise OverLimit(limits.too_large())
        first = b"" if transfer_syntax else fp.read(8)
        fp.seek(offset)
        implicit, little = _encoding(transfer_syntax, first)
        reader: _FileReader | _Inflater = _Inflater(fp, limits) if deflated else _FileReader(fp, size)
        walk = _Walk(reader, little, limits, wanted)
        walk.dataset(None, 0, implicit)
        decoded = reader.finish() if deflated else size - offset
    header = Dataset(walk.values)
    return WalkedInstance(transfer_syntax, offset, size, decoded, walk.elements, header)
