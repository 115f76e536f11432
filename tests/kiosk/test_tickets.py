"""The rules that protect patients, checked on a real store: PIN hashes, lockout, throttle, print limit, audit."""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import kiosk.tickets
from edge.store.db import open_database
from kiosk.tables import KioskAudit, Ticket
from kiosk.tickets import (
    GuardSettings,
    finish_print,
    issue_ticket,
    look_up,
    normalise_code,
    reserve_print,
    ticket_report,
)
from tests.kiosk.conftest import KioskNode, seed_study

CLIENT = "10.0.0.7"


@pytest.fixture
def store(tmp_path: Path) -> Path:
    data_dir = tmp_path / "var"
    open_database(data_dir)
    return data_dir


def test_slip_gets_a_check_digit_code_and_the_pin_is_kept_only_as_an_scrypt_hash(store: Path) -> None:
    ticket = issue_ticket("ACC1", "Lerato Mokoena", "Chest X-ray")
    assert normalise_code(ticket.code) == ticket.code and len(ticket.pin) == 6
    assert normalise_code(f"{ticket.code[:3]} {ticket.code[3:6]}-{ticket.code[6:]}") == ticket.code
    wrong_check = ticket.code[:-1] + str((int(ticket.code[-1]) + 1) % 10)
    assert normalise_code(wrong_check) is None
    row = Ticket.get(Ticket.code == ticket.code)
    assert row.pin_hash.startswith("scrypt$") and ticket.pin not in row.pin_hash
    with sqlite3.connect(store / "edge.db") as db:
        dump = "\n".join(db.iterdump())
    assert ticket.pin not in dump.replace(ticket.code, "")


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[dt.datetime]:
    """The lookup rules' clock, moved by the test (``clock[0] += …``): no race with a busy box."""
    now = [dt.datetime(2026, 11, 24, 9, 0, 0)]
    monkeypatch.setattr(kiosk.tickets, "utcnow", lambda: now[0])
    return now


def test_wrong_pins_lock_the_code_for_a_while_even_against_the_right_pin(store: Path, clock: list[dt.datetime]) -> None:
    seed_study(store, "ACC1", report_text="Normal.")
    ticket = issue_ticket("ACC1", "Lerato Mokoena", "Chest X-ray")
    rules = GuardSettings(max_pin_failures=3, lockout_minutes=0.02)  # 1.2 s
    assert look_up(ticket.code, "000000", CLIENT, rules, store).tries_left == 2
    assert look_up(ticket.code, "000001", CLIENT, rules, store).tries_left == 1
    locked = look_up(ticket.code, "000002", CLIENT, rules, store)
    assert locked.outcome == "locked" and locked.wait_s == pytest.approx(1.2)
    assert look_up(ticket.code, ticket.pin, CLIENT, rules, store).outcome == "locked"
    clock[0] += dt.timedelta(seconds=1.3)
    assert look_up(ticket.code, ticket.pin, CLIENT, rules, store).outcome == "ready"


def test_a_kiosk_that_keeps_failing_is_slowed_down(store: Path, clock: list[dt.datetime]) -> None:
    rules = GuardSettings(throttle_after_failures=3, throttle_max_delay_s=30)
    codes = [issue_ticket(f"A{i}", "X Y", "") .code for i in range(5)]
    outcomes = [look_up(code, "999999", CLIENT, rules, store).outcome for code in codes[:3]]
    assert outcomes == ["wrong_pin"] * 3
    slowed = look_up(codes[3], "999999", CLIENT, rules, store)
    assert slowed.outcome == "throttled" and slowed.wait_s == 1.0
    assert look_up(codes[3], "999999", "10.0.0.8", rules, store).outcome == "wrong_pin"  # another kiosk is not slowed
    clock[0] += dt.timedelta(seconds=1.05)
    assert look_up(codes[4], "999999", CLIENT, rules, store).outcome == "wrong_pin"
    assert look_up(codes[4], "999999", CLIENT, rules, store).wait_s == 2.0  # doubles


def test_print_limit_then_a_technician_allows_one_reprint(tmp_path: Path) -> None:
    node = KioskNode(tmp_path / "node")
    study_uid = seed_study(node.data_dir, "ACC1", report_text="Normal.")
    ticket = issue_ticket("ACC1", "Lerato Mokoena", "Chest X-ray")
    rules = GuardSettings(print_limit=2)
    assert look_up(ticket.code, ticket.pin, CLIENT, rules, node.data_dir).outcome == "ready"
    ticket_id = Ticket.get(Ticket.code == ticket.code).id
    report = ticket_report(ticket_id, node.data_dir, rules)
    assert report is not None and report.prints_left == 2
    sop = report.report.sop_instance_uid
    for _ in range(2):
        audit_id = reserve_print(ticket_id, sop, CLIENT, rules)
        assert audit_id is not None
        finish_print(audit_id, "printed", "kiosk-1", study_uid=study_uid)
    assert reserve_print(ticket_id, sop, CLIENT, rules) is None
    failed = ticket_report(ticket_id, node.data_dir, rules)
    assert failed is not None and failed.prints_left == 0

    done = node.cli("kiosk", "allow-reprint", ticket.code)
    assert "1 more time" in done.stdout
    assert node.cli("kiosk", "allow-reprint", "1234567890", check=False).returncode == 1
    again = reserve_print(ticket_id, sop, CLIENT, rules)
    assert again is not None
    finish_print(again, "failed", detail="paper out")  # a failed print does not use up the allowance
    assert ticket_report(ticket_id, node.data_dir, rules).prints_left == 1  # type: ignore[union-attr]

    audit = [(a.action, a.outcome) for a in KioskAudit.select().order_by(KioskAudit.id)]
    assert audit == [
        ("issue", "issued"), ("lookup", "ready"), ("print", "printed"), ("print", "printed"),
        ("print", "limit_reached"), ("reprint_allowed", "allowed"), ("print", "failed"),
    ]
    rows: list[Any] = list(KioskAudit.select().dicts())
    assert not any(ticket.pin in str(v) for row in rows for v in row.values())
    with sqlite3.connect(node.data_dir / "edge.db") as db:
        assert db.execute("SELECT report_state FROM study").fetchone() == ("printed",)
