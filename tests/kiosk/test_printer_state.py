"""The kiosk printer's real cause reaches reception: one probe (kiosk.printer_state) against a real cupsd,
said the same way by ``edge doctor``, ``edge status``, the heartbeat's figures and the console's Today view."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.node.config import load_config
from kiosk.doctor import check_printer
from kiosk.printer_state import PrinterReport, probe_cups
from tests.console.conftest import TECH, TECH_PASSWORD, console_node, log_in
from tests.kiosk.cups_peer import PPD, CupsPeer, cups_available, private_cups
from tests.node import edge_cli, write_config
from tests.waiting import wait_until

SCHEDULER_DOWN = "CUPS scheduler is not running"


@pytest.fixture
def own_cups() -> Iterator[CupsPeer]:
    """A cupsd of this test's own: the tests stop it, so not the session's shared one."""
    if not cups_available():
        pytest.skip("CUPS and cups-pdf are not installed (scripts/test.sh installs them)")
    with private_cups() as peer:
        yield peer


def doctor_and_status(tmp_path: Path, cups: CupsPeer, queue: str) -> tuple[Any, dict[str, Any], str]:
    config = write_config(tmp_path / f"edge-{queue}.toml", tmp_path / "var",
                          kiosk={"cups_server": cups.server, "cups_queue": queue})
    item = check_printer(load_config(config), require_kiosk=False)
    status = json.loads(edge_cli(config, "status", "--json").stdout)["printer"]
    text = edge_cli(config, "status").stdout
    return item, status, text


def test_each_cause_is_named_with_its_fix_by_the_probe_doctor_and_status(own_cups: CupsPeer, tmp_path: Path) -> None:
    server = own_cups.server
    ok = probe_cups("kiosk", server)
    assert ok == PrinterReport("ok", f"CUPS queue 'kiosk' on {server}", "ready")
    item, status, text = doctor_and_status(tmp_path, own_cups, "kiosk")
    assert item.verdict == "pass" and status["ok"] is True and f"printer   CUPS queue 'kiosk' on {server}: ready" in text

    missing = probe_cups("frontdesk", server)
    assert missing.cause == "queue_missing" and "'frontdesk' does not exist" in missing.summary
    assert "lpadmin -p frontdesk" in missing.fix and "[kiosk] cups_queue" in missing.fix
    item, status, text = doctor_and_status(tmp_path, own_cups, "frontdesk")
    assert item.verdict == "fail" and "does not exist" in item.detail and "lpadmin" in item.hint
    assert status["cause"] == "queue_missing" and "PROBLEM   printer" in text and "does not exist" in text

    own_cups.lpadmin("-p", "stopped", "-E", "-v", f"cups-pdf:/{own_cups.name}", "-P", str(PPD))
    assert own_cups.run("cupsdisable", "stopped").returncode == 0
    stopped = probe_cups("stopped", server)
    assert stopped.cause == "stopped" and "stopped (disabled)" in stopped.summary and "cupsenable stopped" in stopped.fix
    item, status, text = doctor_and_status(tmp_path, own_cups, "stopped")
    assert item.verdict == "fail" and "cupsenable stopped" in item.hint and status["cause"] == "stopped"
    assert own_cups.run("cupsenable", "stopped").returncode == 0
    assert own_cups.run("cupsreject", "stopped").returncode == 0
    rejecting = probe_cups("stopped", server)
    assert rejecting.cause == "stopped" and "cupsaccept stopped" in rejecting.fix

    # Paper out: the printer's backend reports media-empty-error on its first job, as a real one does.
    assert own_cups.run("lp", "-d", "paperout", "/etc/hostname").returncode == 0
    wait_until(lambda: probe_cups("paperout", server).cause == "paper_out", 20, "paperout queue reports media empty",
               every=0.2)
    paper = probe_cups("paperout", server)
    assert paper.summary == "out of paper (media empty)" and "load paper" in paper.fix
    item, status, text = doctor_and_status(tmp_path, own_cups, "paperout")
    assert item.verdict == "fail" and "out of paper" in item.detail and "load paper" in item.hint

    own_cups.stop()
    down = probe_cups("kiosk", server)
    assert down.cause == "scheduler_down" and down.summary == SCHEDULER_DOWN
    assert f"start CUPS on {server}" in down.fix and "lpstat -r" in down.fix
    item, status, text = doctor_and_status(tmp_path, own_cups, "kiosk")
    assert item.verdict == "fail" and SCHEDULER_DOWN in item.detail and "start CUPS" in item.hint
    assert "check the printer is on and cabled" not in item.hint  # the old, wrong advice for this cause
    assert status["summary"] == SCHEDULER_DOWN and f"): {SCHEDULER_DOWN}; fix: start CUPS" in text


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def test_reception_sees_the_printer_on_today_in_the_heartbeat_and_on_metrics(
    node_factory: Any, own_cups: CupsPeer, browser: Any, tmp_path: Path
) -> None:
    textfile = tmp_path / "textfile"
    node = console_node(
        node_factory,
        console={"refresh_s": 1.0},
        kiosk={"cups_server": own_cups.server, "cups_queue": "kiosk", "printer_check_interval_s": 0.5},
        ops={"push_interval_s": 1.0, "textfile_dir": str(textfile)},
    )
    context = browser.new_context(viewport={"width": 1366, "height": 768})
    page = context.new_page()
    page.set_default_timeout(20_000)
    log_in(page, node, TECH, TECH_PASSWORD)
    page.wait_for_selector("text=Today’s visits")
    assert page.query_selector("#printer-problem") is None  # a working printer: no banner
    prom = textfile / "clinic_edge.prom"
    wait_until(lambda: prom.exists() and 'edge_kiosk_printer_ready{reason="ok"} 1.0' in prom.read_text(), 20,
               "the heartbeat's figures say the printer is ready", every=0.2)

    # Someone stops the queue: the open page shows it by itself, with the fix.
    assert own_cups.run("cupsdisable", "kiosk").returncode == 0
    banner = page.wait_for_selector("#printer-problem[data-cause=stopped]")
    assert "Kiosk printer: the print queue is stopped (disabled)" in banner.inner_text()
    assert "cupsenable kiosk" in banner.inner_text()
    assert own_cups.run("cupsenable", "kiosk").returncode == 0
    page.wait_for_selector("#printer-problem", state="detached")

    # The print service itself goes down: the same words on the page, /metrics and the heartbeat.
    own_cups.stop()
    banner = page.wait_for_selector("#printer-problem[data-cause=scheduler_down]")
    text = banner.inner_text()
    assert f"Kiosk printer: {SCHEDULER_DOWN}" in text and "start CUPS on" in text
    page.screenshot(path=str(tmp_path / "today-printer-scheduler-down.png"))
    wait_until(lambda: 'edge_kiosk_printer_ready{reason="scheduler_down"} 0.0' in prom.read_text(), 20,
               "the heartbeat's figures say CUPS is down", every=0.2)
    assert 'edge_kiosk_printer_ready{reason="scheduler_down"} 0.0' in _metrics(node.console_port)
    assert 'edge_kiosk_printer_ok 0.0' in _metrics(node.console_port)  # the kiosk's own gauge agrees
    context.close()
