"""The technician's day in real headless Chromium: log in, register, scan (DCMTK), watch it reach the cloud.

The node is a real ``edge run`` uploading to a real Orthanc (DICOMweb). Routine uploads
are held by ``[sync] routine_windows`` (a window later today), so the image waits as
"received" until the technician marks the visit STAT — then it jumps the queue and the
page shows it reach the cloud, without a reload.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EdgeNode
from tests.console.conftest import ADMIN, ADMIN_PASSWORD, TECH, TECH_PASSWORD, console_node, log_in
from tests.console.helpers import ConsoleClient
from tests.dicom_factory import make_dx
from tests.edge.helpers import query, storescu
from tests.peers.orthanc import OrthancPeer, start_orthanc


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancPeer]:
    peer = start_orthanc(tmp_path)
    yield peer
    peer.kill()


def _later_window() -> str:
    """A routine window that is not now: routine images wait, STAT ones go."""
    start = dt.datetime.now() + dt.timedelta(hours=3)
    end = start + dt.timedelta(hours=1)
    return f"{start:%H:%M}-{end:%H:%M}"


def test_technician_registers_scans_marks_stat_and_watches_it_reach_the_cloud(
    node_factory: Any, orthanc: OrthancPeer, page: Any, tmp_path: Path
) -> None:
    node = console_node(
        node_factory,
        cloud={"dicomweb_url": orthanc.dicomweb_url},
        sync={"enabled": True, "compress": "none", "routine_windows": [_later_window()], "poll_interval_s": 1.0},
        console={"refresh_s": 1.0},
    )
    base = f"http://127.0.0.1:{node.console_port}"
    log_in(page, node, TECH, TECH_PASSWORD)
    page.wait_for_selector("text=Today’s visits")

    # Register: a mistyped SA ID number is refused with a message beside the field.
    page.click("text=+ Register patient")
    page.fill("#surname", "Dlamini")
    page.fill("#given_names", "Thandi")
    page.check("input[name=sex][value=F]")
    page.fill("#id_number", "8001015009088")
    page.click("#register")
    assert "check digit is wrong" in page.inner_text("#id_number-error")
    assert page.input_value("#surname") == "Dlamini"  # what was typed is kept
    page.fill("#id_number", "800101 5009 087")
    page.click("#register")
    page.wait_for_selector("#accession")
    accession = page.inner_text("#accession")
    assert accession.startswith("CLINC0042-")
    assert len(page.inner_text("#slip-code").replace(" ", "")) == 10
    assert len(page.inner_text("#slip-pin").replace(" ", "")) == 6
    slip = page.request.get(page.get_attribute("#slip", "href") and base + page.get_attribute("#slip", "href"))
    assert slip.status == 200 and slip.headers["content-type"] == "application/pdf" and slip.body()[:5] == b"%PDF-"

    page.click("text=Back to today")
    row = "tr[data-order]"
    page.wait_for_selector(f'{row}[data-state="waiting"]')
    page.evaluate("window.__sameDocument = true")  # proves the updates below come without a reload

    image = tmp_path / "cxr.dcm"
    make_dx(image, rows=256, cols=256, accession=accession)
    assert storescu(node, image).returncode == 0
    page.wait_for_selector(f'{row}[data-state="received"]')
    assert "Images received" in page.inner_text(f"{row} td.state")
    page.wait_for_timeout(2500)  # routine window closed: it stays received
    assert page.get_attribute(row, "data-state") == "received" and orthanc.instance_count() == 0

    page.click("text=Mark STAT")
    page.wait_for_selector("text=Marked STAT")
    assert "STAT" in page.inner_text(f"{row} td:nth-child(2)")
    page.evaluate("window.__sameDocument = true")
    page.wait_for_selector(f'{row}[data-state="in_cloud"]', timeout=30000)
    assert orthanc.instance_count() == 1
    assert page.evaluate("window.__sameDocument") is True

    # What the report puller does when the reader's report comes back: the row follows.
    with sqlite3.connect(node.data_dir / "edge.db", timeout=15) as db:
        db.execute("UPDATE study SET report_state = 'ready' WHERE accession_number = ?", (accession,))
    page.wait_for_selector(f'{row}[data-state="report_ready"]')
    assert page.evaluate("window.__sameDocument") is True

    actions = [a for (a,) in query(node, "SELECT action FROM order_audit WHERE user = ? ORDER BY id", TECH)]
    assert actions == ["login", "register", "mark_stat"]
    assert "Dlamini" not in node.log_text()


def test_a_strangers_wrong_passwords_slow_only_the_stranger_and_an_admin_ends_the_wait(
        cnode: EdgeNode, page: Any) -> None:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from tests.console.test_login_delays import PHONE, LanClient

    async def guess() -> list[tuple[int, str]]:  # a phone on the clinic Wi-Fi guesses at the technician's name
        async with LanClient(cnode, PHONE) as phone:
            return [await phone.login(TECH, f"wrong-{attempt}") for attempt in range(5)]

    with ThreadPoolExecutor(1) as other_thread:  # Playwright's sync API holds this thread's event loop
        answers = other_thread.submit(asyncio.run, guess()).result(120)
    assert answers[-1][1].startswith("Wrong user name or password. Too many tries: wait 1 s")
    # At the reception PC the technician's account still works, first try.
    log_in(page, cnode, TECH, TECH_PASSWORD)
    page.wait_for_selector("text=Today’s visits")
    page.click("#logout")
    # The admin sees the guessing and ends it.
    log_in(page, cnode, ADMIN, ADMIN_PASSWORD)
    page.wait_for_selector("text=Today’s visits")
    page.click("text=Users")
    assert "wrong passwords from 1 address(es)" in page.inner_text("table")
    page.click("text=End login delays")
    assert "Login delays ended" in page.inner_text(".notice")
    assert "wrong passwords from" not in page.inner_text("table")
    outcomes = [(d, c) for (d, c) in query(cnode, "SELECT detail, client FROM order_audit "
                                                  "WHERE action = 'login_failed' AND user = ?", TECH)]
    assert outcomes[:4] == [("wrong password", PHONE)] * 4 and outcomes[4] == ("wrong password; next try in 1 s", PHONE)
    assert query(cnode, "SELECT client FROM order_audit WHERE action = 'login' AND user = ?", TECH) == [("127.0.0.1",)]


def test_a_post_without_the_csrf_token_is_refused(cnode: EdgeNode, page: Any) -> None:
    log_in(page, cnode, ADMIN, "admin-pass-1")
    page.wait_for_selector("text=Today’s visits")
    page.click("text=+ Register patient")
    # A form whose token was stripped (what a cross-site form would send): 403, nothing registered.
    page.evaluate("document.querySelector('#register-form input[name=csrf]').remove()")
    page.fill("#surname", "Forged")
    page.fill("#folder_number", "F-1")
    page.fill("#birth_date", "1990-01-01")
    page.check("input[name=sex][value=M]")
    with page.expect_response(lambda r: r.url.endswith("/register") and r.request.method == "POST") as answer:
        page.click("#register")
    assert answer.value.status == 403
    assert "security token" in page.content()
    assert query(cnode, "SELECT COUNT(*) FROM \"order\"") == [(0,)]
    # With the session cookie but a wrong token, from the page's own context: still 403.
    base = f"http://127.0.0.1:{cnode.console_port}"
    assert page.request.post(f"{base}/logout", form={"csrf": "not-the-token"}).status == 403
    assert page.request.post(f"{base}/logout").status == 403
    # Logging in needs its token too.
    client = ConsoleClient(cnode)
    client.get("/login")
    assert client.post("/login", {"user": ADMIN, "password": "admin-pass-1"}, csrf=False)[0] == 403
    # Health and metrics stay open for ops.
    assert client.request("GET", "/metrics")[0] == 200
    assert client.request("GET", "/healthz")[0] in (200, 503)
