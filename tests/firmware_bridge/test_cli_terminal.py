"""The bridge's ``edge`` commands print box ids, versions and names: never a control code that drives the terminal.

A firmware image downloaded from anywhere names its own version, and a box id or patient id
is often pasted; ``ESC[2J`` in any of them must not clear the technician's screen.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from firmware_bridge.firmware import build_image
from tests.conftest import edge_cli, write_config

HOSTILE = "\x1b[2J\x9b31m"
CONTROLS = {*range(0x00, 0x20), *range(0x7F, 0xA0)} - {0x0A}  # newline: only where the CLI puts it


def ecg_firmware(tmp_path: Path, port: Path, image: Path) -> subprocess.CompletedProcess[str]:
    config = write_config(tmp_path / "edge.toml", tmp_path / "var")
    return subprocess.run([sys.executable, "-m", "edge", "--config", str(config), "ecg-firmware", str(port), str(image)],
                          capture_output=True, text=True, timeout=60, check=False)


def _inert(text: str) -> bool:
    return not any(ord(c) in CONTROLS for c in text)


def test_ecg_firmware_refuses_a_hostile_image_version_and_names_it_inertly(tmp_path: Path, link: Path, box: Any) -> None:
    """Before: the escape reached the terminal, and the box came back announcing a version the bridge refuses."""
    sim = box(box_id="ECG-T", speed=1.0).start()
    image = tmp_path / "fw.bin"
    image.write_bytes(build_image("2.0\x1b[2J", os.urandom(3000)))  # the header is ASCII: ESC fits
    result = ecg_firmware(tmp_path, link, image)
    assert result.returncode == 1 and "image version 2.0?[2J is not a printable name" in result.stderr
    assert _inert(result.stdout + result.stderr) and "Traceback" not in result.stderr
    assert sim.box.fw_version == "1.0.0"  # left as it was


def test_ecg_arm_echoes_pasted_ids_inertly(tmp_path: Path) -> None:
    config = write_config(tmp_path / "edge.toml", tmp_path / "var")
    armed = edge_cli(config, "ecg-arm", "ECG" + HOSTILE, "--patient-id", "PID" + HOSTILE, "--accession", "A" + HOSTILE)
    assert "box ECG?[2J?31m armed: its next recording is for patient PID?[2J?31m, accession A?[2J?31m" in armed.stdout
    assert _inert(armed.stdout)
    cleared = edge_cli(config, "ecg-arm", "ECG" + HOSTILE, "--clear")
    assert cleared.stdout == "box ECG?[2J?31m disarmed\n"
