"""The technician's day, issue 16: progress by bytes with an image count, buttons only where they
can act, a reissued slip, and dates and times as the clinic reads them — in headless Chromium
at the reception PC's 1366 × 768, with screenshots kept (the test's tmp dir and /tmp/shots16/).
"""

from __future__ import annotations

import datetime as dt
import http.cookiejar
import json
import re
import shutil
import sqlite3
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EdgeNode
from tests.console.conftest import TECH, TECH_PASSWORD, console_node, log_in
from tests.console.helpers import ConsoleClient
from tests.dicom_factory import make_dx
from tests.edge.helpers import query, storescu
from tests.peers.orthanc import OrthancPeer, start_orthanc
from tests.waiting import wait_until

SHOTS = Path("/tmp/shots16")
PROGRESS = re.compile(r"Uploading (\d+) of (\d+) images?, (\d+) %")


@pytest.fixture
def wide(browser: Any) -> Iterator[Any]:
    """A tab at the reception PC's screen size."""
    context = browser.new_context(viewport={"width": 1366, "height": 768})
    tab = context.new_page()
    tab.set_default_timeout(20000)
    yield tab
    context.close()


def _shot(page: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path))
    SHOTS.mkdir(exist_ok=True)
    shutil.copy(path, SHOTS / path.name)


def _rows(client: ConsoleClient, order_id: int) -> dict[str, Any]:
    status, text, _ = client.request("GET", f"/api/rows?ids={order_id}")
    assert status == 200
    return dict(json.loads(text)[str(order_id)])


def _buttons(html: str) -> set[str]:
    return set(re.findall(r'data-action="([a-z-]+)"', html))


def _post_action(client: ConsoleClient, order_id: int, action: str) -> str:
    """The action's POST; returns where it sends the technician (``?msg=…`` or ``?error=…``)."""
    status, _, headers = client.post(f"/visits/{order_id}/{action}", {})
    assert status == 303, status
    return headers["Location"]


# ---------------------------------------------------------------------- progress by bytes


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancPeer]:
    peer = start_orthanc(tmp_path)
    yield peer
    peer.kill()


def test_five_images_over_a_capped_link_show_bytes_and_an_image_count(
        node_factory: Any, orthanc: OrthancPeer, wide: Any, tmp_path: Path) -> None:
    node = console_node(
        node_factory, cloud={"dicomweb_url": orthanc.dicomweb_url},
        # One slot, the five in one STOW-RS request (the case that sat at 0 %), ~120 kB/s.
        sync={"enabled": True, "compress": "none", "concurrency": 1, "bandwidth_bps": 120_000,
              "poll_interval_s": 1.0, "routine_windows": ["00:00-00:01"]},
        console={"refresh_s": 1.0},
    )
    client = ConsoleClient(node)
    assert client.login(TECH, TECH_PASSWORD) == 303
    order_id = client.register(surname="Mokoena", given_names="Lerato", id_number="8001015009087")
    accession = query(node, 'SELECT accession_number FROM "order" WHERE id = ?', order_id)[0][0]
    study = "1.2.826.0.1.3680043.8.498.16004"
    files = []
    for index, side in enumerate((200, 260, 320, 380, 440)):  # 80 kB to 387 kB: not one size
        path = tmp_path / f"dx{index}.dcm"
        make_dx(path, rows=side, cols=side, study_uid=study, accession=accession, seed=index)
        files.append(path)
    assert storescu(node, *files).returncode == 0
    wait_until(lambda: 'data-state="received"' in _rows(client, order_id)["html"], timeout=30)

    log_in(wide, node, TECH, TECH_PASSWORD)
    wide.wait_for_selector(f'tr[data-order="{order_id}"][data-state="received"]')
    wide.evaluate("window.__sameDocument = true")
    assert _post_action(client, order_id, "stat").endswith("msg=stat")  # outside the window: STAT sends it now

    seen: list[tuple[int, int, int]] = []
    sends_refused = False
    screenshot_taken = False
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        row = _rows(client, order_id)
        if 'data-state="in_cloud"' in row["html"]:
            break
        found = PROGRESS.search(row["html"])
        if found:
            sent, total, percent = (int(g) for g in found.groups())
            seen.append((sent, total, percent))
            if 0 < percent < 100 and not sends_refused:
                # During the upload "Send now" is not offered, and its POST is refused with a notice.
                assert "send-now" not in _buttons(row["html"])
                assert _post_action(client, order_id, "send-now").endswith("error=cannot_send_now")
                sends_refused = True
            if 20 < percent < 90 and not screenshot_taken:
                step = wide.locator(f'tr[data-order="{order_id}"] li[data-step="uploading"]')
                if PROGRESS.search(step.inner_text()) and 0 < int(PROGRESS.search(step.inner_text()).group(3)) < 100:
                    _shot(wide, tmp_path, "today-uploading-1366")
                    screenshot_taken = True
        time.sleep(0.25)
    assert 'data-state="in_cloud"' in _rows(client, order_id)["html"]
    assert orthanc.instance_count() == 5
    percents = [p for _, _, p in seen]
    assert all(total == 5 for _, total, _ in seen)
    assert len({p for p in percents if 0 < p < 100}) >= 3, seen  # it moves while the one request runs
    assert percents == sorted(percents), seen  # never backwards
    counts = [s for s, _, _ in seen]
    assert counts == sorted(counts) and any(0 < s < 5 for s in counts), seen  # "3 of 5 images"
    assert sends_refused and screenshot_taken
    wide.wait_for_selector(f'tr[data-order="{order_id}"][data-state="in_cloud"]')
    assert wide.evaluate("window.__sameDocument") is True  # the open page followed it without a reload


# ---------------------------------------------------------------------- buttons only where they can act


def test_each_button_shows_and_acts_only_where_it_can(cnode: EdgeNode, wide: Any, tmp_path: Path) -> None:
    client = ConsoleClient(cnode)
    assert client.login(TECH, TECH_PASSWORD) == 303
    order_id = client.register(surname="Nkosi", given_names="Sipho", sex="M", id_number="8001015009087")

    # Waiting for images: STAT can act (it raises images as they come); nothing to send, retry or reprint.
    row = _rows(client, order_id)
    assert _buttons(row["html"]) == {"stat", "reissue"}
    assert _post_action(client, order_id, "send-now").endswith("error=cannot_send_now")
    assert _post_action(client, order_id, "reprint").endswith("error=cannot_reprint")
    assert _post_action(client, order_id, "retry").endswith("error=cannot_retry")
    assert _post_action(client, order_id, "check-report").endswith("error=cannot_check_report")

    # Images kept, not sent (no cloud here): Send now can act.
    accession = query(cnode, 'SELECT accession_number FROM "order" WHERE id = ?', order_id)[0][0]
    image = tmp_path / "cxr.dcm"
    make_dx(image, rows=128, cols=128, accession=accession)
    assert storescu(cnode, image).returncode == 0
    wait_until(lambda: 'data-state="received"' in _rows(client, order_id)["html"], timeout=30)
    assert _buttons(_rows(client, order_id)["html"]) == {"stat", "send-now", "reissue"}
    assert _post_action(client, order_id, "send-now").endswith("msg=sent")

    log_in(wide, cnode, TECH, TECH_PASSWORD)
    visit = f'tr[data-order="{order_id}"]'
    wide.wait_for_selector(f'{visit}[data-state="received"]')
    assert wide.locator(f"{visit} [data-action]").evaluate_all("els => els.map(e => e.dataset.action)") == [
        "stat", "send-now", "reissue"]
    _shot(wide, tmp_path, "today-buttons-received-1366")
    # The accession stays on one line at 1366 px (it used to break at its dash).
    acc = wide.locator(f"{visit} .acc")
    assert acc.evaluate("e => e.getClientRects().length") == 1
    assert acc.evaluate("e => e.getBoundingClientRect().height") < 1.6 * acc.evaluate(
        "e => parseFloat(getComputedStyle(e).fontSize)")

    # A stuck image: Retry appears.
    with sqlite3.connect(cnode.data_dir / "edge.db", timeout=15) as db:
        db.execute("UPDATE outbox SET state = 'quarantined', last_error = 'cloud refused it: test'")
    wait_until(lambda: "retry" in _buttons(_rows(client, order_id)["html"]), timeout=15)
    assert "send-now" not in _buttons(_rows(client, order_id)["html"])  # nothing waits: it is stuck
    # In the cloud and printed at the kiosk: no STAT, no Send now; Allow reprint now can act.
    with sqlite3.connect(cnode.data_dir / "edge.db", timeout=15) as db:
        db.execute("UPDATE outbox SET state = 'synced', last_error = ''")
        db.execute("UPDATE study SET report_state = 'printed'")
    wait_until(lambda: 'data-state="printed"' in _rows(client, order_id)["html"], timeout=15)
    # (Check for the report now stays: a reader may amend a printed report.)
    assert _buttons(_rows(client, order_id)["html"]) == {"check-report", "reprint", "reissue"}
    assert _post_action(client, order_id, "stat").endswith("error=cannot_stat")
    assert _post_action(client, order_id, "send-now").endswith("error=cannot_send_now")
    assert _post_action(client, order_id, "reprint").endswith("msg=reprint")
    wide.wait_for_selector(f'{visit}[data-state="printed"]')
    assert wide.locator(f"{visit} [data-action]").evaluate_all("els => els.map(e => e.dataset.action)") == [
        "check-report", "reprint", "reissue"]
    wide.goto(f"http://127.0.0.1:{cnode.console_port}/?error=cannot_stat")  # what a stale page's click leads to
    assert "Mark STAT does nothing now" in wide.inner_text(".notice.error")
    _shot(wide, tmp_path, "today-buttons-printed-1366")

    actions = [a for (a,) in query(cnode, "SELECT action FROM order_audit WHERE user = ? ORDER BY id", TECH)]
    assert actions.count("send_now") == 1 and actions.count("allow_reprint") == 1 and "mark_stat" not in actions


# ---------------------------------------------------------------------- reissue slip


class Kiosk:
    """The kiosk screen's requests, as its browser sends them (cookies, no redirects followed)."""

    def __init__(self, node: EdgeNode) -> None:
        import tomllib

        self.base = f"http://127.0.0.1:{tomllib.loads(node.config.read_text())['kiosk']['port']}"
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()),
                                                  _NoRedirect())

    def post(self, path: str, data: dict[str, str]) -> str:
        req = urllib.request.Request(self.base + path, data=urllib.parse.urlencode(data).encode(), method="POST")
        try:
            with self.opener.open(req, timeout=30) as resp:
                return str(resp.headers.get("Location", ""))
        except urllib.error.HTTPError as exc:
            return str(exc.headers.get("Location", ""))

    def get(self, path: str) -> str:
        with self.opener.open(self.base + path, timeout=30) as resp:
            return str(resp.read().decode())

    def enter(self, code: str, pin: str) -> str:
        """Language, code, PIN: where the kiosk goes next."""
        self.post("/language", {"lang": "en"})
        assert self.post("/code", {"code": code}) == "/pin"
        return self.post("/pin", {"pin": pin})


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _slip(page: Any) -> tuple[str, str]:
    return page.inner_text("#slip-code").replace(" ", ""), page.inner_text("#slip-pin").replace(" ", "")


def test_a_reissued_slip_works_and_the_lost_one_stops_at_once(cnode: EdgeNode, wide: Any, tmp_path: Path) -> None:
    log_in(wide, cnode, TECH, TECH_PASSWORD)
    wide.wait_for_selector("text=Today’s visits")
    wide.click("text=+ Register patient")
    wide.fill("#surname", "Zulu")
    wide.fill("#given_names", "Nomsa")
    wide.check("input[name=sex][value=F]")
    # The date of birth is a plain field in the clinic's format, not the browser's mm/dd/yyyy.
    assert wide.get_attribute("#birth_date", "type") == "text"
    assert wide.get_attribute("#birth_date", "placeholder") == "YYYY-MM-DD"
    assert "mm/dd/yyyy" not in wide.inner_text("#register-form").lower()
    wide.fill("#id_number", "8001015009087")  # the date of birth comes from the SA ID
    wide.click("#register")
    wide.wait_for_selector("#accession")
    old_code, old_pin = _slip(wide)
    order_id = int(wide.url.split("/")[-2])
    accession = wide.inner_text("#accession")
    assert query(cnode, 'SELECT v.birth_date FROM "order" o JOIN visit v ON v.id = o.visit_id WHERE o.id = ?',
                 order_id)[0][0] == "19800101"  # filled in from the SA ID number
    # The registered page: the clinic's time (SAST), the accession on one line.
    registered = wide.inner_text("#registered-at")
    assert re.fullmatch(r"\d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d", registered), registered
    utc = dt.datetime.fromisoformat(wide.get_attribute("#registered-at", "datetime").removesuffix("Z"))
    local = utc + dt.timedelta(hours=2)
    assert registered == f"{local.day} {local:%b %Y %H:%M}"
    assert wide.locator("#accession").evaluate("e => e.getClientRects().length") == 1
    _shot(wide, tmp_path, "registered-1366")

    kiosk = Kiosk(cnode)
    assert kiosk.enter(old_code, old_pin) == "/not-ready"  # the slip works (no images yet)

    wide.click("text=Back to today")
    wide.click(f'tr[data-order="{order_id}"] [data-action="reissue"]')
    wide.wait_for_selector("#reissue-form")
    assert "old slip stops working at once" in wide.inner_text("main")
    _shot(wide, tmp_path, "reissue-confirm-1366")
    wide.select_option("#language", "zu")
    wide.click("#reissue")
    wide.wait_for_selector("#reissued")
    new_code, new_pin = _slip(wide)
    assert new_code != old_code and wide.inner_text("#accession") == accession  # the same visit, a new slip
    slip = wide.request.get(f"http://127.0.0.1:{cnode.console_port}" + wide.get_attribute("#slip", "href"))
    assert slip.status == 200 and slip.body()[:5] == b"%PDF-"
    _shot(wide, tmp_path, "reissued-1366")

    assert Kiosk(cnode).enter(old_code, old_pin) == "/message"  # the lost slip: refused, "ask at reception"
    refused = Kiosk(cnode)
    refused.enter(old_code, old_pin)
    assert "ask at reception" in refused.get("/message")
    assert Kiosk(cnode).enter(new_code, new_pin) == "/not-ready"  # the new one works

    console_audit = query(cnode, "SELECT action, detail FROM order_audit WHERE accession_number = ? ORDER BY id",
                          accession)
    assert ("reissue_slip", "new slip code and PIN; the old slip no longer works") in console_audit
    kiosk_audit = query(cnode, "SELECT action, outcome, code FROM kiosk_audit ORDER BY id")
    assert ("reissue", "revoked", old_code) in kiosk_audit and ("reissue", "issued", new_code) in kiosk_audit
    assert ("lookup", "revoked", old_code) in kiosk_audit and ("lookup", "not_ready", new_code) in kiosk_audit
    assert query(cnode, "SELECT COUNT(*) FROM order_audit WHERE action = 'register'")[0][0] == 1  # no second visit
    assert new_pin not in cnode.log_text() and old_pin not in cnode.log_text()

    # The Audit page reads the clinic's time, and names the reissue.
    wide.goto(f"http://127.0.0.1:{cnode.console_port}/audit")
    assert "When (SAST)" in wide.inner_text("thead")
    first = wide.locator("tbody tr").first
    assert first.locator("td").nth(2).inner_text() == "reissue_slip"
    assert re.fullmatch(r"\d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d", first.locator("td").first.inner_text())
    _shot(wide, tmp_path, "audit-1366")


def test_a_bad_time_zone_stops_start_up_naming_the_key(node_factory: Any) -> None:
    import subprocess
    import sys

    node = node_factory(("run",), node={"timezone": "Africa/Jozi"})
    done = subprocess.run([sys.executable, "-m", "edge", "--config", str(node.config), "status"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "[node] timezone" in done.stderr and "Africa/Jozi" in done.stderr
