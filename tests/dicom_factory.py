"""Synthetic DICOM for tests: DR-size images with unique UIDs, written with pydicom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

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
