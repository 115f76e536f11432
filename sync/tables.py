"""sync's tables: the reader's reports fetched from the cloud, and the puller's per-study state."""

from __future__ import annotations

from peewee import (
    BooleanField,
    CharField,
    DateTimeField,
    ForeignKeyField,
    IntegerField,
    SqliteDatabase,
    TextField,
)

from edge.store.migrations import add_column_if_missing
from edge.store.models import StoreModel, Study, utcnow


class Report(StoreModel):
    """One report instance (SR or encapsulated PDF) from the cloud, kept whatever its status.

    Which one the patient sees is :func:`sync.reports.current_report`'s decision: final
    (verified SR, or PDF) and not superseded.
    """

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
    # v2: verification, amendments
    reading_doctor = CharField(max_length=128, default="")  # VerifyingObserverName, else the author (DICOM PN, ^ as spaces)
    verified_at = CharField(max_length=32, default="")  # the latest VerificationDateTime, DICOM DT
    reported_at = CharField(max_length=14, default="")  # YYYYMMDDHHMMSS: verified_at, else content_datetime; orders reports
    predecessors = TextField(default="")  # SOP instance UIDs named in PredecessorDocumentsSequence, space-separated
    superseded_by = CharField(max_length=64, default="", index=True)  # the newer final report's SOP UID ("" = not superseded)
    superseded_at = DateTimeField(null=True)
    amended_after_printing = BooleanField(default=False)  # this one was printed, then a newer final one replaced it


class ReportPoll(StoreModel):
    """A study's polling state: the per-study backoff (when the cloud refuses UID lists) and "check now"."""

    study = ForeignKeyField(Study, unique=True, on_delete="CASCADE")
    attempts = IntegerField(default=0)
    next_poll_at = DateTimeField(default=utcnow, index=True)
    last_polled_at = DateTimeField(null=True)
    last_error = TextField(default="")
    check_requested_at = DateTimeField(null=True)  # v2: staff asked "check for the report now"; cleared by the next poll


class ReportRetry(StoreModel):
    """A report instance the cloud lists that is not kept (yet): why, and when it is worth fetching again.

    Without it a broken or foreign report would be fetched again on every short poll.
    """

    study = ForeignKeyField(Study, on_delete="CASCADE", index=True)
    sop_instance_uid = CharField(max_length=64, unique=True)
    attempts = IntegerField(default=1)
    next_try_at = DateTimeField(index=True)
    reason = TextField(default="")


SYNC_TABLES = [Report, ReportPoll, ReportRetry]


def _v1_report_tables(db: SqliteDatabase) -> None:
    db.create_tables(SYNC_TABLES, safe=True)


def _v2_verified_and_amended(db: SqliteDatabase) -> None:
    """Additive: verification and amendment columns, "check now", the retry list.

    A study made ready by an unverified SR before this version goes back to "none": the
    patient must not be shown it.
    """
    for name, field in (
        ("reading_doctor", CharField(max_length=128, default="")),
        ("verified_at", CharField(max_length=32, default="")),
        ("reported_at", CharField(max_length=14, default="")),
        ("predecessors", TextField(default="")),
        ("superseded_by", CharField(max_length=64, default="")),
        ("superseded_at", DateTimeField(null=True)),
        ("amended_after_printing", BooleanField(default=False)),
    ):
        add_column_if_missing(db, "report", name, field)
    add_column_if_missing(db, "report_poll", "check_requested_at", DateTimeField(null=True))
    db.create_tables([ReportRetry], safe=True)
    db.execute_sql("UPDATE report SET reported_at = substr(content_datetime, 1, 14) WHERE reported_at = ''")
    db.execute_sql(
        "UPDATE study SET report_state = 'none' WHERE report_state = 'ready' AND NOT EXISTS ("
        " SELECT 1 FROM report WHERE report.study_id = study.id AND (report.kind = 'pdf'"
        " OR (report.verification_flag = 'VERIFIED' AND report.completion_flag = 'COMPLETE')))"
    )


MIGRATIONS = [_v1_report_tables, _v2_verified_and_amended]
