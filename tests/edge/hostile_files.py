"""Files someone on the clinic LAN could send to exhaust the node's memory, built without the memory.

A deflate bomb (Deflated Explicit VR Little Endian whose dataset inflates to hundreds of MB
from well under a megabyte) and an element flood (millions of tiny elements in a file of
ordinary size). Both are written chunk by chunk, so building them costs the test process
a few MB, and both carry a valid identifying header, so only the decoding cost is hostile.
"""

from __future__ import annotations

import functools
import struct
import zlib
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

from tests.dicom_factory import DX_STORAGE, dx_header

MiB = 1 << 20


def _encoded(ds: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def _write_part10(path: Path, sop_uid: str, transfer_syntax: str, body_chunks: list[bytes] | None = None) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax
    with open(path, "wb") as fp:
        fp.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fp, meta, enforce_standard=True)  # type: ignore[arg-type]
        for chunk in body_chunks or []:
            fp.write(chunk)


def _deflated(data: bytes, last: bool = False) -> bytes:
    """``data`` as raw deflate blocks that stand alone (no reference to what came before), so such
    pieces join into one stream; only the ``last`` one ends it."""
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return squeeze.compress(data) + squeeze.flush(zlib.Z_FINISH if last else zlib.Z_FULL_FLUSH)


@functools.cache
def _deflated_mib_of_zeros() -> bytes:
    """One MiB of zeros deflated (~1 KB), compressed once: a 512 MiB bomb repeats it instead of
    squeezing 512 MiB again (seconds of CPU per bomb on the test box)."""
    return _deflated(bytes(MiB))


def write_deflate_bomb(path: Path, inflated_bytes: int = 512 * MiB, study_uid: str | None = None) -> str:
    """A deflated DX whose pixel data is ``inflated_bytes`` of zeros; returns its SOP Instance UID."""
    sop_uid = generate_uid()
    head = _encoded(dx_header(sop_uid, study_uid))
    pixel_length = (inflated_bytes - len(head) - 12) & ~1
    whole, rest = divmod(pixel_length, MiB)
    body = b"".join([
        _deflated(head + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, pixel_length)),
        _deflated_mib_of_zeros() * whole,
        _deflated(bytes(rest), last=True),
    ])
    if len(body) % 2:
        body += b"\0"  # as DCMTK pads a deflated stream
    _write_part10(path, sop_uid, DeflatedExplicitVRLittleEndian, [body])
    return sop_uid


def write_element_flood(path: Path, elements: int = 2_000_000, study_uid: str | None = None) -> str:
    """An explicit VR DX with ``elements`` private US elements (10 bytes each) and a small image."""
    sop_uid = generate_uid()
    rows = cols = 64
    head = _encoded(dx_header(sop_uid, study_uid, rows=rows, cols=cols))
    chunks = [head]
    group, left = 0x0029, elements
    pack = struct.Struct("<HH2sHH").pack
    while left:
        n = min(left, 0xF000)
        chunks.append(b"".join(pack(group, 0x1000 + e, b"US", 2, e & 0xFFFF) for e in range(n)))
        left -= n
        group += 2
    pixels = bytes(range(256)) * (rows * cols * 2 // 256)
    chunks.append(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, len(pixels)) + pixels)
    _write_part10(path, sop_uid, ExplicitVRLittleEndian, chunks)
    return sop_uid


def write_deflated_dx(path: Path, rows: int = 512, cols: int = 512, study_uid: str | None = None) -> str:
    """An ordinary DX image (random pixels, deflates ~1.3x) saved in the deflated transfer syntax."""
    from tests.dicom_factory import make_dx

    ds = make_dx(path, rows=rows, cols=cols, study_uid=study_uid)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def peak_rss_mb(pid: int) -> float:
    """The process's high-water resident set (VmHWM), in MB: what the OOM killer would have seen."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")
