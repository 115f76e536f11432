"""Opening the database: pragmas, the one-writer lock and schema migration."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from peewee import OperationalError, SqliteDatabase

from edge.store.const import DATABASE_NAME

# WAL lets readers (CLI, console) run beside the writer; synchronous=FULL makes a commit
# durable before the C-STORE is acknowledged; busy_timeout covers the other processes.
PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "full",
    "foreign_keys": 1,
    "busy_timeout": 15000,
}

database = SqliteDatabase(None, pragmas=PRAGMAS)
_writer = threading.Lock()


def open_database(data_dir: Path, migrate: bool = True) -> SqliteDatabase:
    """Point the shared database at ``data_dir/edge.db`` and bring its schema up to date."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if not database.is_closed():
        database.close()
    database.init(str(data_dir / DATABASE_NAME), pragmas=PRAGMAS)
    if migrate:
        from edge.store.migrations import migrate_all

        migrate_all(database)
    return database


@contextmanager
def write_transaction() -> Iterator[None]:
    """One writer at a time in this process; IMMEDIATE so it never upgrades mid-way.

    When the disk fills, SQLite rolls the transaction back itself; peewee's own rollback then
    fails with "no transaction is active" and would hide the real error. Callers (C-STORE's
    0xA700, the ECG bridge's NAK STORAGE) need to see "database or disk is full".
    """
    with _writer:
        try:
            with database.atomic("IMMEDIATE"):
                yield
        except OperationalError as exc:
            if "no transaction is active" not in str(exc):
                raise
            cause: BaseException | None = exc.__context__
            while cause is not None and "no transaction is active" in str(cause):  # peewee wraps sqlite3's
                cause = cause.__context__
            if cause is None:
                raise
            raise cause from None
