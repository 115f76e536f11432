"""The orders package's tables: visits, their orders, which study belongs to which order, the audit.

Migrated under the package name ``orders`` (see edge.store.migrations): append steps,
never edit a shipped one.
"""

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

from edge.store.models import StoreModel, Study, utcnow

SCHEMA_PACKAGE = "orders"


class Visit(StoreModel):
    """One patient at the desk: who they are, as the technician registered them."""

    patient_name = CharField(max_length=64)  # DICOM PN: Family^Given; never logged
    patient_id = CharField(max_length=64, index=True)  # SA ID number or clinic folder number
    id_kind = CharField(max_length=8)  # "said" | "folder"
    birth_date = CharField(max_length=8, default="")  # YYYYMMDD
    sex = CharField(max_length=1, default="")
    registered_at = DateTimeField(default=utcnow)
    registered_by = CharField(max_length=64)


class Order(StoreModel):
    """One exam for a visit: a worklist entry for the DR (or an ECG), with its own accession."""

    visit = ForeignKeyField(Visit, backref="orders", on_delete="CASCADE")
    seq = IntegerField(unique=True)
    accession_number = CharField(max_length=16, unique=True)
    study_instance_uid = CharField(max_length=64, unique=True)  # sent on the worklist: images arrive matched
    exam = CharField(max_length=64)
    modality = CharField(max_length=16)
    station_ae = CharField(max_length=16, default="")
    scheduled_date = CharField(max_length=8, index=True)  # node-local YYYYMMDD
    scheduled_time = CharField(max_length=6, default="")  # node-local HHMMSS
    state = CharField(max_length=16, default="scheduled")  # scheduled | started | cancelled
    stat = BooleanField(default=False)
    ticket_code = CharField(max_length=16, default="")  # the kiosk slip's code (never the PIN)
    created_at = DateTimeField(default=utcnow)


class StudyMatch(StoreModel):
    """A received study looked at by matching: its order, or none (flagged unmatched)."""

    study = ForeignKeyField(Study, unique=True, on_delete="CASCADE")
    order = ForeignKeyField(Order, null=True, backref="matches", on_delete="SET NULL", index=True)
    how = CharField(max_length=16)  # study_uid | accession | patient_date | assigned | none
    matched_at = DateTimeField(default=utcnow)
    matched_by = CharField(max_length=64, default="")  # user for "assigned"


class Audit(StoreModel):
    """Who registered, changed, reprinted or logged in, and when; no patient names, no PINs."""

    at = DateTimeField(default=utcnow, index=True)
    user = CharField(max_length=64)
    action = CharField(max_length=32)
    order = ForeignKeyField(Order, null=True, on_delete="SET NULL")
    accession_number = CharField(max_length=16, default="")
    detail = TextField(default="")
    client = CharField(max_length=64, default="")

    class Meta:
        table_name = "order_audit"


ORDER_TABLES = [Visit, Order, StudyMatch, Audit]


def audit(user: str, action: str, order: Order | None = None, detail: str = "", client: str = "") -> Audit:
    """Append an audit row; call inside a write transaction."""
    return Audit.create(
        user=user[:64], action=action[:32], order=order, detail=detail[:500], client=client[:64],
        accession_number=order.accession_number if order is not None else "",
    )


def _v1_order_tables(db: SqliteDatabase) -> None:
    db.create_tables(ORDER_TABLES, safe=True)


MIGRATIONS = [_v1_order_tables]
