"""Versioned schema: each package lists its steps; applied steps are recorded per package.

A clinic's database is never wiped on upgrade. Append a step, never edit a shipped one.
A step that adds a column must use :func:`add_column_if_missing`, because step 1 creates
tables from the current models on a fresh node.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence

from peewee import CharField, DateTimeField, Field, IntegerField, Model, SqliteDatabase
from playhouse.migrate import SqliteMigrator, migrate

from edge.store.db import database

log = logging.getLogger(__name__)

MigrationStep = Callable[[SqliteDatabase], None]

# Modules that own tables, each exposing MIGRATIONS: Sequence[MigrationStep].
# A module may set SCHEMA_PACKAGE to record its steps under its own name (needed for a
# second owner inside one top-level package: the default name is that package's).
SCHEMA_OWNERS: tuple[str, ...] = (
    "edge.store.tables", "sync.tables", "kiosk.tables", "firmware_bridge.tables",
    "edge.orders.tables", "edge.console.tables",
)


class SchemaMigration(Model):
    package = CharField(max_length=64)
    version = IntegerField()
    applied_at = DateTimeField()

    class Meta:
        database = database
        table_name = "schema_migration"
        indexes = ((("package", "version"), True),)


def add_column_if_missing(db: SqliteDatabase, table: str, name: str, field: Field) -> None:
    """Add a column unless a fresh install's create_tables already made it."""
    if name not in {c.name for c in db.get_columns(table)}:
        migrate(SqliteMigrator(db).add_column(table, name, field))


def apply_steps(db: SqliteDatabase, package: str, steps: Sequence[MigrationStep]) -> int:
    """Run the steps of one package not yet applied; return how many ran."""
    from edge.store.models import utcnow

    done = SchemaMigration.select().where(SchemaMigration.package == package).count()
    ran = 0
    for version, step in enumerate(steps[done:], start=done + 1):
        with db.atomic("IMMEDIATE"):
            step(db)
            SchemaMigration.create(package=package, version=version, applied_at=utcnow())
        log.info("schema: %s migrated to version %d", package, version)
        ran += 1
    return ran


def migrate_all(db: SqliteDatabase, owners: Sequence[str] = SCHEMA_OWNERS) -> None:
    """Bring every owner's tables up to date, in the listed order."""
    db.create_tables([SchemaMigration], safe=True)
    for owner in owners:
        module = importlib.import_module(owner)
        apply_steps(db, getattr(module, "SCHEMA_PACKAGE", owner.split(".")[0]), module.MIGRATIONS)
