"""The Audit page as an admin reads it in Chromium: worklist queries are on it, readably.

Who asked (the modality's AE title), from which address, how many patients it was sent, or
why it was refused and how often — and the page's own words say worklist queries are there.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from pathlib import Path
from typing import Any

from tests.conftest import EdgeNode
from tests.console.conftest import ADMIN, ADMIN_PASSWORD, log_in
from tests.console.helpers import ConsoleClient, findscu


def _row_texts(page: Any) -> list[list[str]]:
    return [[cell.strip() for cell in row.locator("td").all_inner_texts()] for row in page.locator("tbody tr").all()]


def test_the_audit_page_shows_worklist_queries_readably(cnode: EdgeNode, page: Any, tmp_path: Path) -> None:
    client = ConsoleClient(cnode)
    assert client.login(ADMIN, ADMIN_PASSWORD) == 303
    client.register(surname="Dlamini", given_names="Thandi", sex="F", id_number="8001015009087")
    assert findscu(cnode, "PatientName=*", "PatientID").returncode == 0  # the DR reads the list: one patient
    for _ in range(3):
        findscu(cnode, "PatientName=*", calling="ANYTHING")  # a stranger, three times

    log_in(page, cnode, ADMIN, ADMIN_PASSWORD)
    deadline = time.monotonic() + 30  # the stranger's count reaches its row within the flush interval
    while True:
        page.goto(f"http://127.0.0.1:{cnode.console_port}/audit")
        rows = [r for r in _row_texts(page) if r[2].startswith("worklist")]
        if any("3 times" in r[4] for r in rows) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    page.screenshot(path=str(tmp_path / "audit.png"), full_page=True)

    intro = page.locator("section.card p.muted").first.inner_text()
    assert "worklist" in intro and "refused" in intro  # the page says worklist queries are on it
    assert [h.strip() for h in page.locator("thead th").all_inner_texts()] == [
        "When (SAST)", "Who", "Action", "Accession", "Detail", "From"]  # [node] timezone: Africa/Johannesburg
    stranger, dr = rows[0], rows[1]  # newest first
    assert stranger[1:3] == ["ANYTHING", "worklist_refused"] and stranger[5] == "127.0.0.1"
    assert "match no configured modality" in stranger[4] and "3 times" in stranger[4]
    assert dr[1:3] == ["DR", "worklist"] and dr[4] == "answered 1 item(s)" and dr[5] == "127.0.0.1"
    stamps = page.locator("tbody tr td:first-child time")
    for index, row in enumerate(rows):
        assert re.fullmatch(r"\d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d", row[0]), row[0]  # "2 Dec 2026 14:05:09"
    for index in range(stamps.count()):  # the clinic's time: the UTC instant (the datetime attribute) two hours on
        utc = dt.datetime.fromisoformat(stamps.nth(index).get_attribute("datetime").removesuffix("Z"))
        assert stamps.nth(index).inner_text() == f"{(utc + dt.timedelta(hours=2)).day} " \
                                                   f"{utc + dt.timedelta(hours=2):%b %Y %H:%M:%S}"
    for row in rows:
        assert "Dlamini" not in row[4] and "8001015009087" not in row[4]  # no patient in the audit's words
    legend = page.locator("ul.legend").inner_text()
    assert "worklist_refused" in legend and "within a minute" in legend
