"""A stale console says so: with the node stopped (or its answers hanging) the open Today page shows
"Lost contact with the node — retrying" within a few seconds, and clears it by itself once the node is back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.console.conftest import TECH, TECH_PASSWORD, console_node, log_in

LOST = "Lost contact with the node — retrying"


def test_today_says_it_lost_contact_and_recovers_by_itself(node_factory: Any, browser: Any, tmp_path: Path) -> None:
    node = console_node(node_factory, console={"refresh_s": 1.0})
    context = browser.new_context(viewport={"width": 1366, "height": 768})
    page = context.new_page()
    page.set_default_timeout(20_000)
    log_in(page, node, TECH, TECH_PASSWORD)
    page.wait_for_selector("text=Today’s visits")
    page.evaluate("window.__sameDocument = true")  # the recovery below comes without a reload
    for _ in range(2):  # a refresh or two has worked: still no banner
        with page.expect_response(lambda r: r.url.endswith("/api/today") and r.ok):
            pass
    assert page.query_selector("#lost-contact") is None

    # The node answers nothing at all (hung): the refresh's deadline turns that into "lost".
    page.route("**/api/today", lambda route: None)
    banner = page.wait_for_selector("#lost-contact", timeout=12_000)
    assert banner.inner_text().startswith(LOST) and "What you see is from" in banner.inner_text()
    page.unroute("**/api/today")
    page.wait_for_selector("#lost-contact", state="detached", timeout=12_000)

    # The node stopped: refused connections, the same banner, the old states greyed.
    node.stop()
    banner = page.wait_for_selector("#lost-contact", timeout=8_000)
    assert LOST in banner.inner_text()
    assert "stale" in (page.get_attribute("body", "class") or "")
    page.screenshot(path=str(tmp_path / "today-lost-contact.png"))

    node.start()
    page.wait_for_selector("#lost-contact", state="detached", timeout=20_000)
    assert "stale" not in (page.get_attribute("body", "class") or "")
    assert page.evaluate("window.__sameDocument") is True
    page.screenshot(path=str(tmp_path / "today-contact-back.png"))
    context.close()
