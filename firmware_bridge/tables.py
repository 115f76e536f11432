"""The bridge's tables: boxes seen, arming for the next recording, and every recording.

Other processes (``edge status``, ``edge ecg-arm``) read and write these, so box state
lives here rather than in the bridge's memory.
"""

from __future__ import annotations

from peewee import (
    AutoField,
    BooleanField,
    CharField,
    DateTimeField,
    IntegerField,
    SqliteDatabase,
    TextField,
)

from edge.store.models import StoreModel, utcnow


class Box(StoreModel):
    """One ECG box, as its last HELLO and STATUS described it."""

    id = AutoField()
    box_id = CharField(max_length=64, unique=True)
    model = CharField(max_length=64, default="")
    fw_version = CharField(max_length=32, default="")
    sample_rate = IntegerField(default=0)
    nv_per_lsb = IntegerField(default=0)
    port = CharField(max_length=255, default="")
    connected = BooleanField(default=False)
    battery_pct = IntegerField(null=True)
    lead_off = CharField(max_length=64, default="")  # electrodes off, e.g. "V3,LA"; "" = all on
    recording = BooleanField(default=False)
    last_seen = DateTimeField(default=utcnow)


class Arming(StoreModel):
    """The technician's "next recording on this box is for this patient/order"."""

    id = AutoField()
    box_id = CharField(max_length=64, unique=True)
    patient_id = CharField(max_length=64)
    patient_name = CharField(max_length=64, default="")  # never logged
    accession_number = CharField(max_length=16, default="")
    armed_at = DateTimeField(default=utcnow)


class EcgRecording(StoreModel):
    """Every recording a box started; ``state`` says what became of it."""

    id = AutoField()
    box_id = CharField(max_length=64, index=True)
    rec_id = IntegerField()
    sop_instance_uid = CharField(max_length=64, default="")
    # receiving | kept | interrupted | failed
    state = CharField(max_length=16, default="receiving")
    damaged = BooleanField(default=False)  # kept, but with samples missing (padding in the file)
    missing_samples = IntegerField(default=0)
    lost_frames = IntegerField(default=0)
    matched = BooleanField(default=False)  # False: no arming, stored for later assignment
    patient_id = CharField(max_length=64, default="")
    accession_number = CharField(max_length=16, default="")
    samples = IntegerField(default=0)
    lead_off = CharField(max_length=64, default="")  # electrodes reported off during it
    started_at = DateTimeField(default=utcnow)
    ended_at = DateTimeField(null=True)
    detail = TextField(default="")

    class Meta:
        table_name = "ecg_recording"
        indexes = ((("box_id", "rec_id"), True),)


BRIDGE_TABLES = [Box, Arming, EcgRecording]


def _v1_bridge_tables(db: SqliteDatabase) -> None:
    db.create_tables(BRIDGE_TABLES, safe=True)


MIGRATIONS = [_v1_bridge_tables]
