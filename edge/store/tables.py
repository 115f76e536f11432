"""The core's schema steps (see edge.store.migrations)."""

from __future__ import annotations

from peewee import SqliteDatabase

from edge.store.models import CORE_TABLES


def _v1_core_tables(db: SqliteDatabase) -> None:
    db.create_tables(CORE_TABLES, safe=True)


MIGRATIONS = [_v1_core_tables]
