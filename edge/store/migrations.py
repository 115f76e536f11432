"""Versioned schema: each package lists its steps; applied steps are recorded per package.

A clinic's database is never wiped on upgrade. Append a step, never edit a shipped one.
A step that adds a column must use :func:`add_column_if_missing`, because step 1 creates
tables from the current models on a fresh node.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from peewee import CharField, DateTimeField, Field, IntegerField, Model, SqliteDatabase
from playhouse.migrate import SqliteMigrator, migrate

from edge.store.db import database

log = logging.getLogger(__name__)

MigrationStep = Callable[[SqliteDatabase], None]


@dataclass(frozen=True)
class Schema:
    """A part's tables and the steps that build them, recorded under ``package`` in schema_migration.

    ``package`` is the name the steps were always recorded under (a shipped node's database
    holds it): never rename it.
    """

    package: str
    tables: tuple[type[Model], ...]
    migrations: Sequence[MigrationStep]


_node_schemas: tuple[Schema, ...] = ()


def use_schemas(schemas: Sequence[Schema]) -> None:
    """The node's registry (edge.node.parts) names every part's schema, in order, once at import.

    The store is the ground: it cannot import the parts, so the roof tells it what to migrate.
    """
    global _node_schemas
    _node_schemas = tuple(schemas)


def node_schemas() -> tuple[Schema, ...]:
    """Every part's schema, as the node's registry gave them."""
    if not _node_schemas:
        raise RuntimeError("the node's parts are not loaded: import edge.node.parts before opening the database")
    return _node_schemas


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
            # The box's services start together on a fresh card: another may have applied this
            # step since the count above (it failed the UNIQUE index, and that service's start).
            if SchemaMigration.select().where((SchemaMigration.package == package) & (SchemaMigration.version == version)).exists():
                continue
            step(db)
            SchemaMigration.create(package=package, version=version, applied_at=utcnow())
        log.info("schema: %s migrated to version %d", package, version)
        ran += 1
    return ran


def migrate_all(db: SqliteDatabase, schemas: Sequence[Schema] | None = None) -> None:
    """Bring every part's tables up to date, in the parts' dependency order."""
    db.create_tables([SchemaMigration], safe=True)
    for schema in node_schemas() if schemas is None else schemas:
        apply_steps(db, schema.package, schema.migrations)
