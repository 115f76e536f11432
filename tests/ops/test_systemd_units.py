"""The shipped systemd units: ``systemd-analyze verify`` clean, hardened, one per service."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from edge.node.services import SERVICE_NAMES
from tests.conftest import REPO

UNITS = REPO / "systemd"
ANALYZE = shutil.which("systemd-analyze")
SERVICES = ("dicom", "sync", "console", "ops", "kiosk", "bridge")
pytestmark = pytest.mark.skipif(ANALYZE is None, reason="needs systemd-analyze (Debian package systemd)")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A filesystem root as the image lays it out: the units, the system's own units, the edge binary."""
    root = tmp_path_factory.mktemp("root")
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    binary = root / "opt/clinic-edge/venv/bin/edge"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    target = root / "etc/systemd/system"
    target.mkdir(parents=True)
    for unit in UNITS.glob("edge*"):
        shutil.copy(unit, target)
    return root


def _analyze(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args, f"--root={root}"], capture_output=True, check=False, text=True, timeout=120,
                          cwd=root / "etc/systemd/system")


def test_every_unit_passes_systemd_analyze_verify_without_a_warning(root: Path) -> None:
    units = ["edge.target", *(f"edge-{s}.service" for s in SERVICES)]
    result = _analyze(root, "verify", "--man=no", *units)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result.stderr


def test_a_misspelt_directive_would_be_reported(root: Path) -> None:
    """The check above is not vacuous: verify names an unknown key."""
    unit = root / "etc/systemd/system/edge-typo.service"
    unit.write_text((UNITS / "edge-dicom.service").read_text().replace("ProtectSystem=", "ProtectSytem="))
    try:
        assert "Unknown key 'ProtectSytem'" in _analyze(root, "verify", "--man=no", unit.name).stderr
    finally:
        unit.unlink()


@pytest.mark.parametrize("service", SERVICES)
def test_unit_is_notify_with_watchdog_restart_and_sandbox(service: str, root: Path) -> None:
    text = (UNITS / f"edge-{service}.service").read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "ProtectSystem=strict", "ReadWritePaths=/var/lib/clinic-edge",
                 "NoNewPrivileges=yes", "PrivateTmp=yes", "User=edge", "PartOf=edge.target", "WantedBy=edge.target"):
        assert line in text, line
    assert re.search(rf"^ExecStart=\S+/edge --config \S+ serve {service}$", text, re.MULTILINE)
    score = _analyze(root, "security", "--offline=true", f"edge-{service}.service")
    exposure = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", score.stdout + score.stderr).group(1))  # type: ignore[union-attr]
    assert exposure <= 2.0, score.stdout[-2000:]


def test_serial_and_printer_access_only_where_needed() -> None:
    assert "SupplementaryGroups=dialout" in (UNITS / "edge-bridge.service").read_text()
    assert "SupplementaryGroups=lp" in (UNITS / "edge-kiosk.service").read_text()
    for service in ("dicom", "sync", "console", "ops"):
        assert "SupplementaryGroups" not in (UNITS / f"edge-{service}.service").read_text()
    assert re.search(r"^u edge ", (UNITS / "sysusers.d/clinic-edge.conf").read_text(), re.MULTILINE)
    assert re.search(r"^d\s+/var/lib/clinic-edge/data\s+0750\s+edge\s+edge", (UNITS / "tmpfiles.d/clinic-edge.conf").read_text(), re.MULTILINE)


def test_every_core_service_has_a_unit() -> None:
    for name in SERVICE_NAMES:
        assert (UNITS / f"edge-{name}.service").exists(), name
