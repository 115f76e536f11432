"""A stranger looping refused C-FINDs is one audit row with a count, not the console's audit page.

Before: every refused query wrote its own row (and fsync), so 300 queries — a few seconds of
a loop — pushed every other entry off the Audit page (newest 300) and queued 300 writes
beside the DR's C-STOREs. Now one row per (calling AE, address) per minute says how many.
"""

from __future__ import annotations

import datetime as dt
import html
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind

from edge.dicom import worklist
from edge.orders.tables import Audit
from tests.conftest import EdgeNode
from tests.console.conftest import ADMIN, ADMIN_PASSWORD
from tests.console.helpers import ConsoleClient, findscu

REASON = "refused (0xC000): AE title and address match no configured modality"


class _Timers:
    """Flush timers the test fires by hand: no sleeping for a window to pass."""

    def __init__(self) -> None:
        self.pending: list[Callable[[], None]] = []

    def __call__(self, delay: float, call: Callable[[], None]) -> None:
        self.pending.append(call)

    def fire(self) -> None:
        calls, self.pending = self.pending, []
        for call in calls:
            call()


@pytest.fixture
def store(tmp_path: Path) -> None:
    from edge.store.db import open_database

    open_database(tmp_path / "var")


def _rows() -> list[tuple[str, str, str, str]]:
    return [(a.user, a.action, a.detail, a.client) for a in Audit.select().order_by(Audit.id)]


def test_repeats_are_counted_into_one_row_per_window(store: None) -> None:
    now = [1000.0]
    wall = iter(dt.datetime(2026, 12, 1, 8, 0, s) for s in range(60)).__next__
    timers = _Timers()
    refused = worklist.RefusedQueries(window_s=60, flush_s=5, clock=lambda: now[0], wall=wall, timer=timers)
    refused.record("ANYTHING", "10.0.0.9", REASON)
    assert _rows() == [("ANYTHING", "worklist_refused", REASON, "10.0.0.9")]  # the first one is written at once
    for _ in range(36):
        now[0] += 1
        refused.record("ANYTHING", "10.0.0.9", REASON)
    assert len(timers.pending) == 1 and _rows()[0][2] == REASON  # counted in memory, one flush on its way
    timers.fire()
    assert _rows() == [("ANYTHING", "worklist_refused", f"{REASON} — 37 times, 08:00:00 to 08:00:36", "10.0.0.9")]

    refused.record("OTHER", "10.0.0.9", REASON)  # another AE title: its own row
    now[0] += 30  # the first window is over: the next refusal opens a new row
    refused.record("ANYTHING", "10.0.0.9", REASON)
    assert [r[0] for r in _rows()] == ["ANYTHING", "OTHER", "ANYTHING"]
    assert _rows()[2][2] == REASON


def test_rotating_ae_titles_from_one_address_share_a_row(store: None) -> None:
    timers = _Timers()
    refused = worklist.RefusedQueries(window_s=60, flush_s=5, ae_per_address=4, clock=lambda: 0.0, timer=timers)
    for n in range(50):
        refused.record(f"AE{n}", "10.0.0.9", REASON)
    timers.fire()
    rows = _rows()
    assert [r[0] for r in rows] == ["AE0", "AE1", "AE2", "AE3", worklist.SEVERAL_AE_TITLES]
    assert rows[4][2].startswith(f"{REASON} — 46 times")
    refused.record("DR", "10.0.0.2", REASON)  # another address is not folded into the stranger's row
    assert _rows()[-1][:2] == ("DR", "worklist_refused")


def test_concurrent_refusals_are_all_counted(store: None) -> None:
    timers = _Timers()
    refused = worklist.RefusedQueries(window_s=60, flush_s=5, clock=lambda: 0.0, timer=timers)
    start = threading.Barrier(8)

    def loop() -> None:
        start.wait()
        for _ in range(50):
            refused.record("ANYTHING", "10.0.0.9", REASON)

    threads = [threading.Thread(target=loop) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    timers.fire()
    assert len(_rows()) == 1 and " — 400 times, " in _rows()[0][2]


def _audit_page_rows(client: ConsoleClient) -> list[list[str]]:
    status, page = client.get("/audit")
    assert status == 200
    rows = [[html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", page, re.S)]
    return [r for r in rows if len(r) == 6 and r[2].startswith("worklist")]


def test_a_loop_of_refused_queries_is_one_counted_row_on_the_audit_page(cnode: EdgeNode) -> None:
    client = ConsoleClient(cnode)
    assert client.login(ADMIN, ADMIN_PASSWORD) == 303
    ae = AE(ae_title="ANYTHING")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(ModalityWorklistInformationFind)
    query = Dataset()
    query.PatientName = "*"
    assoc = ae.associate("127.0.0.1", cnode.port, ae_title=cnode.ae_title)
    assert assoc.is_established
    try:
        for _ in range(60):  # one stranger, one association, 60 refused C-FINDs
            statuses = [int(status.Status) for status, _ in assoc.send_c_find(query, ModalityWorklistInformationFind)]
            assert statuses == [0xC000]
    finally:
        assoc.release()
    assert findscu(cnode, "PatientName=*", calling="ANYTHING").returncode == 0  # DCMTK's findscu too: 61

    deadline = time.monotonic() + 30  # the count reaches the row within the flush interval (5 s)
    while (rows := _audit_page_rows(client)) and " — 61 times, " not in rows[0][4] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(rows) == 1, rows  # before: 61 rows
    user, action, detail, source = rows[0][1], rows[0][2], rows[0][4], rows[0][5]
    assert (user, action, source) == ("ANYTHING", "worklist_refused", "127.0.0.1")
    assert re.fullmatch(re.escape(REASON) + r" — 61 times, \d\d:\d\d:\d\d to \d\d:\d\d:\d\d", detail), detail

    assert findscu(cnode, "PatientName=*").returncode == 0  # the DR: every answered query keeps its own row
    assert findscu(cnode, "PatientName=*").returncode == 0
    rows = _audit_page_rows(client)
    assert [r[1:3] + [r[4]] for r in rows[:2]] == [["DR", "worklist", "answered 0 item(s)"]] * 2 and len(rows) == 3
