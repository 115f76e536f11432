"""The console's tables: local user accounts, their login sessions, and login delays (per name and address, per address).

In the database rather than in memory so that ``edge user add`` / ``edge user unlock``
(another process) and a console restart see the same accounts, and a delay survives a
restart.
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
    failed_logins = IntegerField(default=0)  # unused since v2: failures count per (user, address), see LoginDelay
    locked_until = DateTimeField(null=True)  # unused since v2
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


class LoginDelay(StoreModel):
    """Wrong logins from one address for one user name, and when that pair may try again.

    Keyed by the name as typed (known or not, so the table says nothing about which names
    exist) and the client address: a stranger's guesses slow only the stranger.
    """

    user_name = CharField(max_length=64)
    client = CharField(max_length=64)
    failures = IntegerField(default=0)
    next_try_at = DateTimeField(default=utcnow)
    last_failure_at = DateTimeField(default=utcnow, index=True)

    class Meta:
        table_name = "console_login_delay"
        indexes = ((("user_name", "client"), True),)


class LoginAddressDelay(StoreModel):
    """Wrong logins from one address across every user name, in the current window, and when it may try again.

    The pair delay above gives each typed name its own free tries: one phone cycling through
    names would never slow down. This row is the address's budget over all names.
    """

    client = CharField(max_length=64, unique=True)
    failures = IntegerField(default=0)
    window_start = DateTimeField(default=utcnow)
    next_try_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = "console_login_address_delay"


CONSOLE_TABLES = [ConsoleUser, ConsoleSession]


def _v1_console_tables(db: SqliteDatabase) -> None:
    db.create_tables(CONSOLE_TABLES, safe=True)


def _v2_login_delays(db: SqliteDatabase) -> None:
    db.create_tables([LoginDelay], safe=True)


def _v3_login_address_delays(db: SqliteDatabase) -> None:
    db.create_tables([LoginAddressDelay], safe=True)


MIGRATIONS = [_v1_console_tables, _v2_login_delays, _v3_login_address_delays]
