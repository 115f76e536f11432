"""sync's tables: the reader's reports fetched from the cloud, and per-study polling state."""

from __future__ import annotations

from peewee import (
    CharField,
    DateTimeField,
    ForeignKeyField,
    IntegerField,
    SqliteDatabase,
    TextField,
)

from edge.store.models import StoreModel, Study, utcnow


class Report(StoreModel):
    """One report instance (SR or encapsulated PDF) from the cloud, kept for the kiosk."""

    study = ForeignKeyField(Study, backref="reports", on_delete="CASCADE", index=True)
    sop_instance_uid = CharField(max_length=64, unique=True)
    sop_class_uid = CharField(max_length=64)
    kind = CharField(max_length=8)  # "sr" | "pdf"
    text = TextField(default="")  # the SR content tree as plain text; "" for a PDF
    pdf_path = CharField(max_length=255, default="")  # relative to <data_dir>/reports
    dicom_path = CharField(max_length=255)  # the fetched Part 10 file, relative to <data_dir>/reports
    completion_flag = CharField(max_length=16, default="")  # COMPLETE / PARTIAL (SR only)
    verification_flag = CharField(max_length=16, default="")  # VERIFIED / UNVERIFIED (SR only)
    content_datetime = CharField(max_length=32, default="")  # the reader's ContentDate+Time
    fetched_at = DateTimeField(default=utcnow)


class ReportPoll(StoreModel):
    """When to ask the cloud again for a study's report; backs off per study."""

    study = ForeignKeyField(Study, unique=True, on_delete="CASCADE")
    attempts = IntegerField(default=0)
    next_poll_at = DateTimeField(default=utcnow, index=True)
    last_polled_at = DateTimeField(null=True)
    last_error = TextField(default="")


SYNC_TABLES = [Report, ReportPoll]


def _v1_report_tables(db: SqliteDatabase) -> None:
    db.create_tables(SYNC_TABLES, safe=True)


MIGRATIONS = [_v1_report_tables]
