"""The core's schema steps (see edge.store.migrations)."""

from __future__ import annotations

from peewee import BigIntegerField, BooleanField, DateTimeField, SqliteDatabase

from edge.store.migrations import add_column_if_missing
from edge.store.models import CORE_TABLES


def _v1_core_tables(db: SqliteDatabase) -> None:
    db.create_tables(CORE_TABLES, safe=True)


def _v2_sync_and_retention_columns(db: SqliteDatabase) -> None:
    """Columns the outbox worker and retention need (sync issue)."""
    add_column_if_missing(db, "instance", "evicted_at", DateTimeField(null=True))
    add_column_if_missing(db, "outbox", "synced_at", DateTimeField(null=True))
    add_column_if_missing(db, "outbox", "uploaded_bytes", BigIntegerField(default=0))
    add_column_if_missing(db, "outbox", "uncertain", BooleanField(default=False))


MIGRATIONS = [_v1_core_tables, _v2_sync_and_retention_columns]
