"""Reading back what the bridge kept, the way the reading centre would see it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from edge.store.models import Instance, Outbox
from edge.store.spool import Spool
from firmware_bridge.boxes import recordings
from firmware_bridge.const import Msg
from firmware_bridge.protocol import Frame, FrameDecoder, RecEnd, RecStart, Samples, parse
from firmware_bridge.session import BoxSession
from tests.firmware_bridge.conftest import bridge_config

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


class _Line:
    """Stands in for the port's writer; the bridge's answers are parsed back as the box would."""

    def __init__(self) -> None:
        self.sent = bytearray()

    def write(self, data: bytes) -> None:
        self.sent += data

    def heard(self) -> list[tuple[int, object]]:
        frames = [f for f in FrameDecoder().feed(bytes(self.sent)) if f is not None]
        self.sent.clear()
        return [(f.type, parse(f)) for f in frames]


class SessionBox:
    """A box talking to a session in process, frame by frame: what it says, what it hears back."""

    def __init__(self, session: BoxSession) -> None:
        self.session, self.seq = session, 0
        self.line = _Line()
        session._writer = self.line  # type: ignore[assignment]

    def say(self, kind: Msg, payload: bytes) -> list[tuple[int, object]]:
        self.seq += 1
        asyncio.run(self.session._on_frame(Frame(1, kind, self.seq, payload)))
        return self.line.heard()

    def record(self, rec_id: int, n: int = 50, columns: int = 8, end: bool = True) -> list[tuple[int, object]]:
        """REC_START, one SAMPLES block, REC_END (unless ``end`` is False); what the bridge answered."""
        self.say(Msg.REC_START, RecStart(rec_id, 500, n).pack())
        self.say(Msg.SAMPLES, Samples(rec_id, 0, np.full((n, columns), 100, np.int16)).pack())
        return self.say(Msg.REC_END, RecEnd(rec_id, n).pack()) if end else []


def box_session(tmp_path: Path, store: Spool, **kwargs: Any) -> BoxSession:
    """A session as the bridge makes one per port, with nothing on the port: frames come from a SessionBox.

    ``kwargs``: BoxSession's keyword arguments (``limits``, ``min_free_mb`` …)."""
    config = bridge_config(tmp_path, tmp_path / "no-port")
    return BoxSession("/dev/ttyECG0", config.bridge, store, "Test Clinic", "edge-test", **kwargs)
