"""kiosk's tables: the slips' tickets (code + PIN hash) and the audit log of lookups and prints."""

from __future__ import annotations

from peewee import CharField, DateTimeField, ForeignKeyField, IntegerField, SqliteDatabase, TextField

from edge.store.models import StoreModel, utcnow


class Ticket(StoreModel):
    """One patient slip: what the code + PIN open. The PIN itself is never stored."""

    code = CharField(max_length=16, unique=True)
    pin_hash = CharField(max_length=160)  # scrypt$n$r$p$salt_hex$hash_hex
    accession_number = CharField(max_length=16, index=True)
    patient_name = CharField(max_length=128)
    exam = CharField(max_length=128, default="")
    issued_at = DateTimeField(default=utcnow)
    expires_at = DateTimeField()
    failed_pins = IntegerField(default=0)  # unused since v2: PinGuard counts per code, issued or not
    locked_until = DateTimeField(null=True)  # unused since v2
    extra_prints = IntegerField(default=0)  # reprints a technician allowed beyond the limit

    class Meta:
        table_name = "kiosk_ticket"


class KioskAudit(StoreModel):
    """Every lookup and print, for the clinic's records: time, code, outcome. Never the PIN."""

    at = DateTimeField(default=utcnow, index=True)
    action = CharField(max_length=16)
    outcome = CharField(max_length=24)
    code = CharField(max_length=16, default="", index=True)
    ticket = ForeignKeyField(Ticket, null=True, backref="audit", on_delete="SET NULL")
    client = CharField(max_length=64, default="", index=True)  # the kiosk's address (per-client throttle)
    report_sop_uid = CharField(max_length=64, default="")
    job = CharField(max_length=64, default="")  # the printer's job id
    detail = TextField(default="")

    class Meta:
        table_name = "kiosk_audit"


class PinGuard(StoreModel):
    """Wrong PINs against one submitted slip code, whether or not a slip has that code.

    Kept per code typed, not per ticket, so "tries left" and "locked" read the same for a
    code nobody was given: the kiosk never tells which codes exist.
    """

    code = CharField(max_length=16, unique=True)
    failed_pins = IntegerField(default=0)  # wrong PINs since the last lock or right PIN
    locked_until = DateTimeField(null=True)
    last_try_at = DateTimeField(default=utcnow, index=True)

    class Meta:
        table_name = "kiosk_pin_guard"


KIOSK_TABLES = [Ticket, KioskAudit, PinGuard]


def _v1_kiosk_tables(db: SqliteDatabase) -> None:
    db.create_tables(KIOSK_TABLES, safe=True)


def _v2_pin_guard(db: SqliteDatabase) -> None:  # a fresh node already has it from step 1
    db.create_tables([PinGuard], safe=True)


MIGRATIONS = [_v1_kiosk_tables, _v2_pin_guard]
