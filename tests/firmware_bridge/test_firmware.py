"""``edge ecg-firmware``: a box is updated, a garbled chunk is sent again, a bad image rolls back."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from firmware_bridge.const import Msg, Nak
from firmware_bridge.firmware import build_image
from firmware_bridge.lines import PtyLine
from firmware_bridge.protocol import NakMsg
from firmware_bridge.simulator import SoftwareBox
from tests.firmware_bridge.conftest import BoxThread


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "ce-ecg8-2.0.0.bin"
    path.write_bytes(build_image("2.0.0", os.urandom(5000)))
    return path


def ecg_firmware(tmp_path: Path, port: Path, image: Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "edge.toml"
    config.write_text(f'[storage]\ndata_dir = "{tmp_path / "var"}"\n')
    return subprocess.run([sys.executable, "-m", "edge", "--config", str(config), "ecg-firmware", str(port), str(image)],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def idle_box(box: Any) -> Any:
    def make(**kwargs: Any) -> BoxThread:
        return box(box_id="ECG-F", speed=1.0, **kwargs).start()
    return make


def test_firmware_update_switches_the_box_to_the_new_version(tmp_path: Path, link: Path, image: Path, idle_box: Any) -> None:
    sim = idle_box()
    result = ecg_firmware(tmp_path, link, image)
    assert result.returncode == 0, result.stderr
    assert "box ECG-F: firmware 1.0.0 -> 2.0.0" in result.stdout
    assert sim.box.fw_version == "2.0.0"


def test_garbled_chunk_is_sent_again_and_the_update_completes(tmp_path: Path, link: Path, image: Path, idle_box: Any) -> None:
    sim = idle_box(corrupt_chunk=3)
    result = ecg_firmware(tmp_path, link, image)
    assert result.returncode == 0, result.stderr
    assert "(1 chunk(s) sent again)" in result.stdout
    assert sim.box.stats.naks_bad_frame == 1 and sim.box.fw_version == "2.0.0"


def test_hash_mismatch_rolls_back_and_the_box_keeps_its_old_firmware(
    tmp_path: Path, link: Path, image: Path, idle_box: Any
) -> None:
    sim = idle_box(reject_firmware=True)
    result = ecg_firmware(tmp_path, link, image)
    assert result.returncode == 1
    assert "SHA-256 mismatch" in result.stderr and "rolled back" in result.stderr
    assert "stays on firmware 1.0.0" in result.stderr and "Traceback" not in result.stderr
    assert sim.box.fw_version == "1.0.0"


def test_not_a_firmware_image_is_refused_before_touching_the_box(tmp_path: Path, link: Path, idle_box: Any) -> None:
    sim = idle_box()
    junk = tmp_path / "photo.jpg"
    junk.write_bytes(b"\xff\xd8\xff\xe0 not firmware")
    result = ecg_firmware(tmp_path, link, junk)
    assert result.returncode == 1 and "not a box firmware image" in result.stderr
    assert sim.box.fw_version == "1.0.0"


def test_a_box_refused_for_its_lead_set_can_still_be_updated(tmp_path: Path, link: Path, image: Path, idle_box: Any) -> None:
    """The bridge refuses its recordings; new firmware may be what fixes the lead set."""
    sim = idle_box(leads=("V1", "V2", "V3", "V4", "V5", "V6"))
    result = ecg_firmware(tmp_path, link, image)
    assert result.returncode == 0, result.stderr
    assert "box ECG-F: firmware 1.0.0 -> 2.0.0" in result.stdout and sim.box.fw_version == "2.0.0"


class _RewindingBox(SoftwareBox):
    """A hostile (or broken) box: every chunk is answered "start again from 0"."""

    def _firmware(self, kind: int, seq: int, msg: object) -> None:
        if kind == Msg.FW_CHUNK:
            return self._send(Msg.NAK, NakMsg(kind, seq, Nak.BAD_OFFSET, 0).pack())
        return super()._firmware(kind, seq, msg)


def test_a_box_rewinding_for_ever_is_given_up_on_and_rolled_back(tmp_path: Path, link: Path, image: Path) -> None:
    line = PtyLine(link)
    sim = _RewindingBox(line, box_id="ECG-R")
    thread = threading.Thread(target=sim.run, kwargs={"duration": 60}, daemon=True)
    thread.start()
    try:
        result = ecg_firmware(tmp_path, link, image)  # before: the tool looped until killed
    finally:
        sim.stop()
        thread.join(5)
        line.close()
    assert result.returncode == 1, result.stdout
    assert "kept asking for chunks again" in result.stderr and "rolled back" in result.stderr
    assert "Traceback" not in result.stderr and sim.fw_version == "1.0.0"
