"""Seed files for the DICOM fuzz targets: real-world files and the node's own kinds of instance.

Real-world: files from pydicom's own test data, shipped inside the pydicom package (no
download), from several vendors and toolkits: CT, MR in every uncompressed byte order,
RLE, JPEG-LS, JPEG 2000, a deflated image, structured reports, an RT plan, private and
UN-encoded sequences, a waveform. The node's own: a DX as the DR sends it and a 12-lead
ECG as the bridge writes it, each also deflated.
"""

from __future__ import annotations

import datetime as dt
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom.dsutils import split_dataset

from firmware_bridge.ecg_dicom import EcgContext, build_ecg, write_ecg
from firmware_bridge.protocol import Hello
from tests.dicom_factory import make_dx
from tests.fuzz.mutate import deflated

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
REAL_WORLD = (
    "CT_small.dcm",  # GE CT, explicit little endian
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "JPEG2000.dcm",
    "image_dfl.dcm",  # deflated explicit little endian
    "test-SR.dcm",
    "reportsi.dcm",
    "rtplan.dcm",  # nested sequences, implicit VR
    "liver_1frame.dcm",
    "SC_rgb_small_odd.dcm",
)


@dataclass(frozen=True)
class Seed:
    """One file split where the mutator works: the file meta stays, the dataset is mutated."""

    name: str
    head: bytes  # preamble + DICM + file meta, as written
    dataset: bytes  # the dataset as it goes on the wire (deflated for the deflate syntax)
    sop_class: str
    sop_instance: str  # in the file meta (the C-STORE request's Affected SOP Instance UID)
    transfer_syntax: str
    dataset_uid: str  # SOP Instance UID in the dataset: a few real files disagree with their meta

    @property
    def is_deflated(self) -> bool:
        return self.transfer_syntax == DeflatedExplicitVRLittleEndian

    def plain_dataset(self) -> bytes:
        """The dataset before deflate (for structure-aware mutations of a deflated seed)."""
        if not self.is_deflated:
            return self.dataset
        return zlib.decompress(self.dataset, -15)


def _split(path: Path, name: str) -> Seed:
    raw = path.read_bytes()
    meta, offset = split_dataset(path)
    uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    return Seed(name, raw[:offset], raw[offset:], str(meta.MediaStorageSOPClassUID),
                str(meta.MediaStorageSOPInstanceUID), str(meta.TransferSyntaxUID), uid)


def _deflated_copy(seed: Seed, where: Path) -> Seed:
    """The same instance sent deflated: what a modality proposing 1.2.840.10008.1.2.1.99 sends."""
    ds = dcmread(where / f"{seed.name}")
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = where / f"{seed.name}.dfl.dcm"
    ds.save_as(path, enforce_file_format=True)
    out = _split(path, f"{seed.name}-deflated")
    assert deflated(out.plain_dataset())  # it round-trips
    return out


def _ecg(path: Path) -> None:
    hello = Hello("ECG-FUZZ-1", "CE-ECG8", "1.0.0", 500, 2500)
    rng = np.random.default_rng(3)
    samples = rng.integers(-2000, 2000, size=(1000, 8), dtype=np.int16)
    ctx = EcgContext(hello, 7, dt.datetime(2026, 11, 23, 9, 30), None, "Fuzz Clinic", "edge-fuzz", 0, "")
    write_ecg(build_ecg(ctx, samples), path)


def build_seeds(where: Path) -> list[Seed]:
    """Every seed as a Part 10 file under ``where`` and split for the mutator."""
    where.mkdir(parents=True, exist_ok=True)
    seeds = [_split(PYDICOM_FILES / name, name) for name in REAL_WORLD if (PYDICOM_FILES / name).exists()]
    make_dx(where / "dx.dcm", rows=64, cols=64, seed=5)
    _ecg(where / "ecg.dcm")
    for name in ("dx.dcm", "ecg.dcm"):
        own = _split(where / name, name)
        seeds += [own, _deflated_copy(own, where)]
    return seeds


def same_length_uid(uid: str, rng: random.Random) -> str:
    """A new UID of exactly the same length (2.25 + digits), so a seed carries it without moving a byte."""
    if len(uid) < 7:
        return uid
    n = len(uid) - 5
    return "2.25." + str(rng.randint(1, 9)) + "".join(str(rng.randrange(10)) for _ in range(n - 1))
