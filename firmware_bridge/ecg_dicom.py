"""A finished recording as a DICOM 12-lead ECG (Waveform Storage) Part 10 file.

The box sends I, II and V1–V6; III, aVR, aVL and aVF follow from Einthoven's and
Goldberger's equations, so the reading centre gets the twelve leads it expects.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from firmware_bridge.boxes import ArmedOrder
from firmware_bridge.const import SCPECG_LEADS, TWELVE_LEAD_ECG_SOP_CLASS, TWELVE_LEADS
from firmware_bridge.protocol import Hello, missing_leads
from firmware_bridge.recording import PADDING

_UID_NAMESPACE = uuid.UUID("6f1d3c52-8a0e-4b7e-9a51-3c2a1e0f7b10")


def stable_uid(*parts: object) -> str:
    """A 2.25 UID fixed by its parts: a resent recording gets the same SOP Instance UID."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '/'.join(map(str, parts))).int}"


class MissingLeads(ValueError):
    """The recording lacks leads the twelve cannot do without: no retry will ever make it whole."""

    def __init__(self, missing: tuple[str, ...]) -> None:
        super().__init__(f"the box did not send lead(s) {', '.join(missing)}, which a 12-lead ECG needs")
        self.missing = missing


def twelve_leads(acquired: np.ndarray, leads: tuple[str, ...]) -> np.ndarray:
    """(n, 12) int16 in TWELVE_LEADS order from the box's (n, k) samples; padding stays padding.

    Raises ``MissingLeads`` when ``leads`` lacks I, II or a chest lead (HELLO refuses such a
    box already; this keeps a KeyError from ever reaching the box as NAK STORAGE).
    """
    missing = missing_leads(leads)
    if missing:
        raise MissingLeads(missing)
    if acquired.ndim != 2 or acquired.shape[1] != len(leads):
        raise ValueError(f"samples have shape {acquired.shape}, not (n, {len(leads)})")
    col = {name: acquired[:, i].astype(np.float64) for i, name in enumerate(leads)}
    lead_i, lead_ii = col["I"], col["II"]
    col["III"] = lead_ii - lead_i
    col["aVR"] = -(lead_i + lead_ii) / 2
    col["aVL"] = lead_i - lead_ii / 2
    col["aVF"] = lead_ii - lead_i / 2
    out = np.empty((len(acquired), len(TWELVE_LEADS)), dtype=np.int16)
    gap = (acquired[:, leads.index("I")] == PADDING) | (acquired[:, leads.index("II")] == PADDING)
    for j, name in enumerate(TWELVE_LEADS):
        if name in leads:  # as the box sent it, padding included
            out[:, j] = acquired[:, leads.index(name)]
            continue
        values = np.clip(np.rint(col[name]), -32767, 32767).astype(np.int16)
        values[gap] = PADDING
        out[:, j] = values
    return out


@dataclass(frozen=True)
class EcgContext:
    """Everything about a recording that is not samples."""

    hello: Hello
    rec_id: int
    acquired_at: dt.datetime  # local time of REC_START
    order: ArmedOrder | None
    institution: str
    station: str
    missing_samples: int = 0
    lead_off: str = ""


def _code(value: str, scheme: str, meaning: str, version: str = "") -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    if version:
        item.CodingSchemeVersion = version
    item.CodeMeaning = meaning
    return item


def _channel(lead: str, sensitivity: str) -> Dataset:
    ch = Dataset()
    code, meaning = SCPECG_LEADS[lead]
    ch.ChannelSourceSequence = Sequence([_code(code, "SCPECG", meaning, "1.3")])
    ch.ChannelSensitivity = sensitivity
    ch.ChannelSensitivityUnitsSequence = Sequence([_code("uV", "UCUM", "microvolt", "1.4")])
    ch.ChannelSensitivityCorrectionFactor = "1"
    ch.ChannelBaseline = "0"
    ch.ChannelSampleSkew = "0"
    ch.WaveformBitsStored = 16
    return ch


def _annotation(text: str) -> Dataset:
    item = Dataset()
    item.UnformattedTextValue = text
    item.AnnotationGroupNumber = 0
    return item


def build_ecg(ctx: EcgContext, acquired: np.ndarray) -> Dataset:
    """The 12-lead ECG dataset for one recording of ``acquired`` (n, k) samples in LSB."""
    hello = ctx.hello
    samples = twelve_leads(acquired, hello.leads)
    sop_uid = UID(stable_uid("ecg", hello.box_id, ctx.rec_id))
    when = ctx.acquired_at
    now = dt.datetime.now()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(TWELVE_LEAD_ECG_SOP_CLASS)
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = TWELVE_LEAD_ECG_SOP_CLASS
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.StudyInstanceUID = stable_uid("ecg-study", hello.box_id, ctx.rec_id)
    ds.SeriesInstanceUID = stable_uid("ecg-series", hello.box_id, ctx.rec_id)
    ds.StudyDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = when.strftime("%H%M%S")
    ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S")
    ds.AccessionNumber = ctx.order.accession_number if ctx.order else ""
    ds.Modality = "ECG"
    ds.Manufacturer = "Clinic Edge"
    ds.ManufacturerModelName = hello.model
    ds.DeviceSerialNumber = hello.box_id
    ds.SoftwareVersions = hello.fw_version
    ds.InstitutionName = ctx.institution
    ds.StationName = ctx.station[:16]
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "12-lead ECG"
    ds.SeriesDescription = "12-lead ECG"
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientName = ctx.order.patient_name if ctx.order else ""
    ds.PatientID = ctx.order.patient_id if ctx.order else ""
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.AcquisitionContextSequence = Sequence([])

    group = Dataset()
    group.MultiplexGroupTimeOffset = "0"
    group.WaveformOriginality = "ORIGINAL"
    group.NumberOfWaveformChannels = len(TWELVE_LEADS)
    group.NumberOfWaveformSamples = len(samples)
    group.SamplingFrequency = str(hello.sample_rate)
    group.MultiplexGroupLabel = "RHYTHM"
    sensitivity = f"{hello.nv_per_lsb / 1000:g}"
    group.ChannelDefinitionSequence = Sequence([_channel(lead, sensitivity) for lead in TWELVE_LEADS])
    group.WaveformBitsAllocated = 16
    group.WaveformSampleInterpretation = "SS"
    group.WaveformPaddingValue = np.int16(PADDING).tobytes()
    group.WaveformData = samples.astype("<i2").tobytes()
    ds.WaveformSequence = Sequence([group])

    notes = []
    if ctx.missing_samples:
        notes.append(
            f"signal missing: {ctx.missing_samples} samples ({ctx.missing_samples / hello.sample_rate:.2f} s) "
            "lost in transmission, shown as padding"
        )
    if ctx.lead_off:
        notes.append(f"electrode(s) off during recording: {ctx.lead_off}")
    if notes:
        ds.WaveformAnnotationSequence = Sequence([_annotation(text) for text in notes])
    return ds


def write_ecg(ds: Dataset, path: Path) -> None:
    """Write the Part 10 file (the caller fsyncs it through keep_instance)."""
    ds.save_as(path, enforce_file_format=True)
