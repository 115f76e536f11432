"""A card that was never provisioned boots into a safe state that says what is missing (issue 15, item 8).

``edge serve unprovisioned`` runs from the shipped defaults only: the DR's association is
refused at once (DCMTK shows the rejection), the console's port says in plain words what
is missing and what to do, /healthz answers 503 with the reason, and nothing is written.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.node.unprovisioned import find_missing_setup
from tests.conftest import DCMTK, REPO, EdgeNode, wait_for_port
from tests.dicom_factory import make_dx

UNIT = REPO / "systemd" / "edge-unprovisioned.service"
ANALYZE = shutil.which("systemd-analyze")
SHOTS = Path("/tmp/shots-unprovisioned")  # kept after the run, to look at
# As image/firstboot.sh writes it when `edge provision --check` refuses the file.
FIRSTBOOT_ERROR = (
    "Clinic Edge first boot failed (2026-01-05T06:12:40Z):\n"
    "/boot/efi/edge-provision.toml: [dicom] port: Input should be less than or equal to 65535 (got 70000)\n"
    "Fix edge-provision.toml (edge provision --image-file ...) and restart the box.\n"
)


class Unprovisioned(EdgeNode):
    """``edge serve unprovisioned`` on free ports, its card (the ESP) a folder of the test's."""

    def __init__(self, tmp: Path) -> None:
        tmp.mkdir(exist_ok=True)
        super().__init__(tmp, ("serve", "unprovisioned"))
        self.boot = tmp / "boot"
        self.boot.mkdir()

    def start(self) -> Unprovisioned:
        super().start()
        wait_for_port(self.console_port, proc=self.proc)
        return self

    def get(self, path: str) -> tuple[int, str, dict[str, str]]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.console_port}{path}", timeout=10) as answer:
                return answer.status, answer.read().decode(), dict(answer.headers)
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode(), dict(error.headers)

    def echoscu(self, calling: str = "DR1") -> tuple[subprocess.CompletedProcess[str], float]:
        started = time.monotonic()
        done = subprocess.run([str(DCMTK / "echoscu"), "-v", "-aet", calling, "-aec", self.ae_title, "127.0.0.1",
                               str(self.port)], capture_output=True, text=True, timeout=60, check=False)
        return done, time.monotonic() - started

    def files(self) -> list[str]:
        """Everything in the node's folder (its config, its log and the card are the test's own)."""
        return sorted(str(p.relative_to(self.tmp)) for p in self.tmp.rglob("*"))


def _start(tmp: Path, monkeypatch: pytest.MonkeyPatch, error_text: str | None = None) -> Unprovisioned:
    box = Unprovisioned(tmp)
    if error_text is not None:
        (box.boot / "firstboot-error.txt").write_text(error_text)
    monkeypatch.setenv("EDGE_BOOT", str(box.boot))
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    return box.start()


@pytest.fixture(scope="module")
def blank_card(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Unprovisioned]:
    """A card with no edge-provision.toml (and no first-boot error): one box for the module's checks."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        box = _start(tmp_path_factory.mktemp("blank"), monkeypatch)
    yield box
    box.kill()


@pytest.fixture
def failed_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Unprovisioned]:
    """A card whose first boot stopped on a bad key: firstboot-error.txt on the ESP."""
    box = _start(tmp_path / "failed", monkeypatch, FIRSTBOOT_ERROR)
    yield box
    box.kill()


def test_echoscu_is_rejected_at_once_and_the_log_names_the_caller_and_the_reason(blank_card: Unprovisioned) -> None:
    done, took_s = blank_card.echoscu("DR1")
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "Association Rejected" in output and "Rejected Permanent" in output and "Service User" in output, output
    assert took_s < 20, f"echoscu took {took_s:.1f} s: a rejection, not a timeout, must end it"
    blank_card.wait_for_log("association from DR1 (127.0.0.1:")
    line = next(ln for ln in blank_card.log_text().splitlines() if "association from DR1 (127.0.0.1:" in ln)
    assert f"to {blank_card.ae_title} refused: node not provisioned: no edge-provision.toml was on its card" in line


def test_storescu_is_rejected_and_nothing_is_written(blank_card: Unprovisioned, tmp_path: Path) -> None:
    image = tmp_path / "dx.dcm"
    make_dx(image, rows=64, cols=64)
    before = blank_card.files()
    done = blank_card.storescu(image, calling="XRAY2")
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "Association Rejected" in output and "Rejected Permanent" in output, output
    blank_card.wait_for_log("association from XRAY2 (127.0.0.1:")
    assert not blank_card.data_dir.exists()  # no data dir made, no store opened, no spool file
    assert blank_card.files() == before == ["boot", "edge.toml", "node.log"]


def test_the_reason_is_printed_once_on_start_for_the_console(blank_card: Unprovisioned) -> None:
    log = blank_card.log_text()
    printed = [ln for ln in log.splitlines() if ln.startswith("Clinic Edge: node not provisioned:")]
    assert printed == [("Clinic Edge: node not provisioned: no edge-provision.toml was on its card. "
                        "DICOM is refused until the box is set up.")]
    assert any(ln.startswith("Clinic Edge: to fix: 1. ") and "edge provision --image-file" in ln for ln in log.splitlines())


def test_the_console_page_says_what_is_missing_and_what_to_do(blank_card: Unprovisioned) -> None:
    status, page, headers = blank_card.get("/")
    assert status == 503 and headers["Content-Type"].startswith("text/html")
    text = re.sub(r"<[^>]+>", " ", page)
    assert "This box is not set up yet" in text
    assert "No provisioning file (edge-provision.toml) was on its card" in text
    assert "edge provision --image-file" in text and "restart the box" in text
    assert headers["X-Frame-Options"] == "DENY" and "default-src 'self'" in headers["Content-Security-Policy"]
    assert blank_card.get("/today")[1] == page  # a technician's bookmark of the node's page lands here too
    assert blank_card.get("/static/console.css")[0] == 200


def test_healthz_is_503_with_the_reason(blank_card: Unprovisioned) -> None:
    status, body, headers = blank_card.get("/healthz")
    assert status == 503 and headers["Content-Type"].startswith("application/json")
    health = json.loads(body)
    assert health["status"] == "unprovisioned"
    assert health["reason"] == "node not provisioned: no edge-provision.toml was on its card"
    assert health["checks"]["provisioned"] == {"ok": False, "critical": True, "detail": health["reason"]}


def test_ready_is_sent_to_systemd_with_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(20)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "400000")
        box = _start(tmp_path / "notify", monkeypatch)
        try:
            messages = [sock.recv(4096).decode() for _ in range(2)]
            assert messages[0] == "READY=1\nSTATUS=node not provisioned: no edge-provision.toml was on its card"
            assert messages[1] == "WATCHDOG=1"
            assert box.stop() == 0
        finally:
            box.kill()


def test_it_runs_from_the_appliance_s_shipped_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """/usr/lib/clinic-edge/edge.toml as image/build.sh makes it (data_dir on the data partition), on free ports."""
    import tomlkit

    shipped = subprocess.run([str(REPO / "image/appliance-config.sh")], capture_output=True, text=True, timeout=30,
                             check=True).stdout
    doc = tomlkit.parse(shipped)
    assert doc["storage"]["data_dir"] == "/var/lib/clinic-edge/data"  # type: ignore[index]
    box = Unprovisioned(tmp_path / "shipped")
    for section in ("dicom", "console"):
        doc[section]["bind_address"] = "127.0.0.1"  # type: ignore[index]
        doc[section]["port"] = box.port if section == "dicom" else box.console_port  # type: ignore[index]
    box.config.write_text(tomlkit.dumps(doc))
    monkeypatch.setenv("EDGE_BOOT", str(box.boot))
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    box.start()
    try:
        done, _ = box.echoscu()
        assert "Rejected Permanent" in done.stdout + done.stderr
        assert json.loads(box.get("/healthz")[1])["status"] == "unprovisioned"
    finally:
        box.kill()


def test_unprovisioned_runs_alone(tmp_path: Path) -> None:
    box = Unprovisioned(tmp_path / "alone")
    done = subprocess.run([*_edge(box), "serve", "unprovisioned", "dicom"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 2 and "unprovisioned runs alone" in done.stderr


def _edge(box: EdgeNode) -> list[str]:
    return [sys.executable, "-m", "edge", "--config", str(box.config)]


# ---------------------------------------------------------------------- what is missing, case by case


def test_the_causes_in_order(tmp_path: Path) -> None:
    boot, creds, sys_block = tmp_path / "boot", tmp_path / "creds", tmp_path / "sys"
    for folder in (boot, creds, sys_block / "vda1", sys_block / "vda4"):
        folder.mkdir(parents=True)
    (sys_block / "vda1" / "uevent").write_text("MAJOR=254\nDEVNAME=vda1\nPARTNAME=esp\n")
    (creds / "firstboot-error").write_text("\n")  # the unit's SetCredential= default: no error on the card
    assert find_missing_setup(boot, creds, sys_block).why == "no edge-provision.toml was on its card"

    (sys_block / "vda4" / "uevent").write_text("MAJOR=254\nDEVNAME=vda4\nPARTNAME=edge-data\n")
    missing = find_missing_setup(boot, creds, sys_block)
    assert missing.headline == "The box's data partition did not open" and "call support" in " ".join(missing.fix)

    (boot / "edge-provision.toml").write_text("[node]\n")
    assert find_missing_setup(boot, creds, sys_block).why == "edge-provision.toml is on the card but first boot did not apply it"

    (creds / "firstboot-error").write_text(FIRSTBOOT_ERROR)  # systemd's copy of the root-only ESP file
    missing = find_missing_setup(boot, creds, sys_block)
    assert missing.headline == "First boot failed" and missing.details == FIRSTBOOT_ERROR.strip()
    assert "\n" not in missing.reason and "(got 70000)" in missing.reason


def test_a_hostile_error_file_stays_one_printable_line_and_escaped(tmp_path: Path) -> None:
    from edge.node.unprovisioned import make_page_app

    (tmp_path / "firstboot-error.txt").write_text("bad\x1b[2J<script>alert(1)</script>\n" + "x" * 20000)
    missing = find_missing_setup(tmp_path, None, tmp_path)
    assert "\x1b" not in missing.reason and len(missing.reason) < 400
    assert len(missing.details) <= 4000

    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    async def fetch() -> str:
        async with TestClient(TestServer(make_page_app(missing))) as client:
            answer = await client.get("/")
            return await answer.text()

    page = asyncio.run(fetch())
    assert "<script>" not in page and "&lt;script&gt;" in page


# ---------------------------------------------------------------------- in Chromium (last: Playwright keeps an event loop open)


def test_a_failed_first_boot_is_shown_with_its_text(failed_card: Unprovisioned, browser: Any) -> None:
    assert failed_card.get("/")[0] == 503
    health = json.loads(failed_card.get("/healthz")[1])
    assert health["reason"].startswith("node not provisioned: first boot failed: Clinic Edge first boot failed")
    assert "[dicom] port: Input should be less than or equal to 65535 (got 70000)" in health["reason"]
    done, _ = failed_card.echoscu("DR1")
    assert done.returncode != 0 and "Association Rejected" in done.stdout + done.stderr
    failed_card.wait_for_log("association from DR1 (127.0.0.1:")
    assert "refused: node not provisioned: first boot failed: " in failed_card.log_text()

    context = browser.new_context(viewport={"width": 1366, "height": 768})  # the reception PC
    try:
        tab = context.new_page()
        tab.goto(f"http://127.0.0.1:{failed_card.console_port}/")
        assert tab.locator("h1").inner_text() == "First boot failed"
        assert tab.locator("#details").inner_text().strip() == FIRSTBOOT_ERROR.strip()
        steps = tab.locator("#fix li").all_inner_texts()
        assert "edge provision --image-file" in steps[1] and "restart the box" in steps[2]
        SHOTS.mkdir(exist_ok=True)
        tab.screenshot(path=str(SHOTS / "first-boot-failed.png"), full_page=True)
    finally:
        context.close()
    assert (SHOTS / "first-boot-failed.png").stat().st_size > 10_000



# ---------------------------------------------------------------------- the unit


@pytest.mark.skipif(ANALYZE is None, reason="needs systemd-analyze (Debian package systemd)")
def test_the_unit_is_clean_sandboxed_and_runs_only_without_the_node_config(tmp_path: Path) -> None:
    text = UNIT.read_text()
    for line in ("ConditionPathExists=!/etc/clinic-edge/edge.toml", "Type=notify", "NotifyAccess=main", "WatchdogSec=60s",
                 "Restart=on-failure", "ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes", "User=edge",
                 "StandardOutput=journal+console", "StandardError=journal", "WantedBy=multi-user.target",
                 "LoadCredential=firstboot-error:/boot/efi/firstboot-error.txt", "After=network.target"):
        assert line in text, line
    assert "ReadWritePaths" not in text and "PartOf=edge.target" not in text and "RequiresMountsFor" not in text
    assert re.search(r"^ExecStart=\S+/edge --config /usr/lib/clinic-edge/edge.toml serve unprovisioned$", text, re.MULTILINE)

    root = tmp_path / "root"
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    binary = root / "opt/clinic-edge/venv/bin/edge"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    shutil.copy(UNIT, units)
    assert ANALYZE is not None

    def analyze(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([ANALYZE, *args, f"--root={root}"], capture_output=True, text=True, timeout=120,
                              cwd=units, check=False)

    verify = analyze("verify", "--man=no", UNIT.name)
    assert verify.returncode == 0 and not verify.stdout.strip() and not verify.stderr.strip(), verify.stderr
    score = analyze("security", "--offline=true", UNIT.name)
    exposure = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", score.stdout + score.stderr).group(1))  # type: ignore[union-attr]
    assert exposure <= 2.0, score.stdout[-2000:]
