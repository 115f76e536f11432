"""Reading back what the bridge kept, the way the reading centre would see it."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from edge.store.models import Instance, Outbox
from edge.store.spool import Spool
from firmware_bridge.boxes import recordings

LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")


def kept_recordings(box_id: str | None = None) -> list[dict[str, Any]]:
    return [r for r in reversed(recordings(box_id)) if r["state"] == "kept"]


def kept_dataset(spool: Spool, sop_instance_uid: str) -> Dataset:
    instance = Instance.get(Instance.sop_instance_uid == sop_instance_uid)
    return dcmread(spool.path_of(instance))


def raw_waveform(ds: Dataset) -> np.ndarray:
    group = ds.WaveformSequence[0]
    return np.frombuffer(group.WaveformData, "<i2").reshape(-1, int(group.NumberOfWaveformChannels))


def outbox_of(sop_instance_uid: str) -> Outbox:
    return Outbox.select().join(Instance).where(Instance.sop_instance_uid == sop_instance_uid).get()
