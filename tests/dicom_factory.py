"""Synthetic DICOM for tests and benchmarks: DR-size images with unique UIDs, written with pydicom.

No pytest here: bench/ builds its images with these from the run-only venv.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, generate_uid

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def dx_header(
    sop_uid: str,
    study_uid: str | None = None,
    series_uid: str | None = None,
    rows: int = 512,
    cols: int = 512,
    accession: str = "ACC0001",
) -> Dataset:
    """A DX image's attributes up to (not including) its pixels: what every synthetic DX shares."""
    ds = Dataset()
    ds.SOPClassUID = DX_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientID = "P0001"
    ds.AccessionNumber = accession
    ds.StudyDate = "20261123"
    ds.Modality = "DX"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    return ds


def make_dx(
    path: Path,
    rows: int = 512,
    cols: int = 512,
    study_uid: str | None = None,
    series_uid: str | None = None,
    accession: str = "ACC0001",
    seed: int = 0,
    omit: tuple[str, ...] = (),
) -> Dataset:
    """A DX image (16-bit MONOCHROME2) saved as Part 10; ``omit`` drops attributes for bad-input tests."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16)
    ds = dx_header(generate_uid(), study_uid, series_uid, rows, cols, accession)
    ds.PatientName = "TEST^PATIENT"
    ds.PixelData = pixels.tobytes()
    for name in omit:
        if name in ds:
            delattr(ds, name)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_STORAGE
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", generate_uid())
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return ds


def dr_like_pixels(rows: int, cols: int, seed: int = 0, bits_stored: int = 12) -> np.ndarray:
    """A chest-DR-like uint16 image: smooth anatomy plus signal-dependent quantum noise.

    Pure random noise would not compress at all and a clean gradient would compress
    absurdly well; real DR lies between, and its lossless ratio is set mostly by the
    noise, which here has a standard deviation of ~15 DN in the body (12-bit data).
    """
    rng = np.random.default_rng(seed)
    top = float(2**bits_stored - 1)
    y = np.linspace(-1.0, 1.0, rows, dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, cols, dtype=np.float32)[None, :]
    img = np.full((rows, cols), 0.80 * top, np.float32) + (0.05 * top) * y  # open field, heel effect
    thickness = np.sqrt(np.clip(1.0 - (x / 0.72) ** 2 - (y / 0.9) ** 2, 0.0, None))  # the body
    img -= (0.45 * top) * thickness
    for cx in (-0.33, 0.33):  # lungs
        img += (0.15 * top) * np.sqrt(np.clip(1.0 - ((x - cx) / 0.25) ** 2 - ((y + 0.1) / 0.5) ** 2, 0.0, None))
    inside = thickness > 0
    img -= (0.06 * top) * (0.5 + 0.5 * np.sin(2 * np.pi * (7.0 * y + 1.5 * np.abs(x)))) ** 4 * inside  # ribs
    img -= (0.12 * top) * np.exp(-((x / 0.06) ** 2)) * inside  # spine
    for _ in range(4):  # low-frequency texture
        fy, fx, phase = rng.uniform(1, 6), rng.uniform(1, 6), rng.uniform(0, 2 * np.pi)
        img += (0.01 * top) * np.sin(np.pi * (fy * y + fx * x) + phase)
    img[(np.abs(x) > 0.95) | (np.abs(y) > 0.95)] = 0.04 * top  # collimated border
    np.clip(img, 0.0, top, out=img)
    img += np.sqrt(img) * rng.standard_normal((rows, cols), dtype=np.float32) * 0.35  # quantum noise
    np.clip(np.rint(img, out=img), 0.0, top, out=img)
    return img.astype(np.uint16)


def write_dr(
    path: Path,
    pixels: np.ndarray,
    transfer_syntax: str = ExplicitVRLittleEndian,
    bits_stored: int = 12,
    pixel_representation: int = 0,
) -> Path:
    """Save `pixels` (rows x cols, or frames x rows x cols) as a DX Part 10 file."""
    ds = Dataset()
    ds.SOPClassUID = DX_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "TEST^PATIENT"
    ds.PatientID = "P0001"
    ds.AccessionNumber = "ACC0001"
    ds.StudyDate = "20261123"
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    ds.PixelRepresentation = pixel_representation
    big = transfer_syntax == ExplicitVRBigEndian
    ds.PixelData = (pixels.byteswap() if big else pixels).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    dcmwrite(path, ds, enforce_file_format=True)
    return path


def tiny_pdf(text: str = "Report") -> bytes:
    """A minimal valid one-page PDF, with a correct xref table."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)
