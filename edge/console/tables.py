"""The console's tables: local user accounts and their login sessions.

In the database rather than in memory so that ``edge user add`` (another process) and a
console restart see the same accounts, and a lockout survives a restart.
"""

from __future__ import annotations

from peewee import (
    BooleanField,
    CharField,
    DateTimeField,
    ForeignKeyField,
    IntegerField,
    SqliteDatabase,
)

from edge.store.models import StoreModel, utcnow

SCHEMA_PACKAGE = "console"


class ConsoleUser(StoreModel):
    name = CharField(max_length=64, unique=True)
    role = CharField(max_length=16)  # technician | admin
    password_hash = CharField(max_length=255)
    failed_logins = IntegerField(default=0)
    locked_until = DateTimeField(null=True)
    disabled = BooleanField(default=False)
    created_at = DateTimeField(default=utcnow)
    last_login_at = DateTimeField(null=True)

    class Meta:
        table_name = "console_user"


class ConsoleSession(StoreModel):
    """Only a hash of the cookie's token is kept: a copied database opens no session."""

    token_hash = CharField(max_length=64, unique=True)
    user = ForeignKeyField(ConsoleUser, backref="sessions", on_delete="CASCADE")
    csrf = CharField(max_length=64)
    created_at = DateTimeField(default=utcnow)
    last_seen = DateTimeField(default=utcnow)

    class Meta:
        table_name = "console_session"


CONSOLE_TABLES = [ConsoleUser, ConsoleSession]


def _v1_console_tables(db: SqliteDatabase) -> None:
    db.create_tables(CONSOLE_TABLES, safe=True)


MIGRATIONS = [_v1_console_tables]
