"""The core's tables: studies, series, instances, the outbox and the event log."""

from __future__ import annotations

import datetime as dt

from peewee import (
    AutoField,
    BigIntegerField,
    BooleanField,
    CharField,
    DateTimeField,
    ForeignKeyField,
    IntegerField,
    Model,
    TextField,
)

from edge.store.const import PRIORITY_ROUTINE, ReportState, SyncState
from edge.store.db import database


def utcnow() -> dt.datetime:
    """Naive UTC, the one time base in the database."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class StoreModel(Model):
    id = AutoField()  # what peewee adds anyway; declared so type checkers know it

    class Meta:
        database = database
        legacy_table_names = False


class Study(StoreModel):
    study_instance_uid = CharField(max_length=64, unique=True)
    accession_number = CharField(max_length=16, default="")
    patient_id = CharField(max_length=64, default="")
    study_date = CharField(max_length=8, default="")
    received_at = DateTimeField(default=utcnow)
    updated_at = DateTimeField(default=utcnow)
    report_state = CharField(max_length=16, default=ReportState.NONE.value)


class Series(StoreModel):
    series_instance_uid = CharField(max_length=64, unique=True)
    study = ForeignKeyField(Study, backref="series", on_delete="CASCADE")
    modality = CharField(max_length=16, default="")


class Instance(StoreModel):
    sop_instance_uid = CharField(max_length=64, unique=True)
    sop_class_uid = CharField(max_length=64)
    study = ForeignKeyField(Study, backref="instances", on_delete="CASCADE", index=True)
    series = ForeignKeyField(Series, backref="instances", on_delete="CASCADE")
    path = CharField(max_length=255)  # relative to the spool
    size = BigIntegerField()
    sha256 = CharField(max_length=64)
    transfer_syntax = CharField(max_length=64)
    calling_aet = CharField(max_length=16, default="")
    source = CharField(max_length=16, default="dicom")  # dicom | ecg | reconcile
    received_at = DateTimeField(default=utcnow)
    file_missing = BooleanField(default=False)
    # Set when retention removed the file after sync: the row stays as the tombstone that
    # recognises a re-send of the same instance.
    evicted_at = DateTimeField(null=True)


class Outbox(StoreModel):
    """One row per instance to upload.

    One writer: the row is born in the instance's own transaction (``edge.store.spool.queue_upload``,
    the only insert) and every later change of state, priority or due time is a function of
    ``sync.outbox``; other packages read it through the typed queries there or in ``edge.store.queries``.
    """

    instance = ForeignKeyField(Instance, unique=True, backref="outbox", on_delete="CASCADE")
    state = CharField(max_length=16, default=SyncState.PENDING.value, index=True)
    priority = IntegerField(default=PRIORITY_ROUTINE)
    attempts = IntegerField(default=0)
    next_attempt_at = DateTimeField(default=utcnow)
    last_error = TextField(default="")
    created_at = DateTimeField(default=utcnow)
    updated_at = DateTimeField(default=utcnow)
    synced_at = DateTimeField(null=True)
    uploaded_bytes = BigIntegerField(default=0)  # bytes on the wire for this instance (after compression)
    # The request body may have reached the cloud before the link failed: ask (QIDO-RS)
    # before sending again, so nothing is stored twice.
    uncertain = BooleanField(default=False)


class EventLog(StoreModel):
    """What happened, for ops and the technician: no patient names, ids only."""

    at = DateTimeField(default=utcnow, index=True)
    kind = CharField(max_length=32)
    study_instance_uid = CharField(max_length=64, default="")
    sop_instance_uid = CharField(max_length=64, default="")
    detail = TextField(default="")


CORE_TABLES: list[type[Model]] = [Study, Series, Instance, Outbox, EventLog]


def log_event(kind: str, detail: str = "", study_uid: str = "", sop_uid: str = "") -> None:
    """Append to the event log; call inside a write transaction."""
    EventLog.create(kind=kind, detail=detail, study_instance_uid=study_uid, sop_instance_uid=sop_uid)
