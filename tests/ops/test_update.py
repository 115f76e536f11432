"""``edge update``: a bundle made by the real ``tar`` into a fake slot and ESP, bad bundles refused
before a byte is written, and the slots (with a failed update) in status, /healthz and the heartbeat.

No VM: the partition is a regular file, the ESP a folder, /proc/cmdline a file (EDGE_* variables,
as image/firstboot.sh's tests do). tests/appliance/ does it for real under QEMU.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge.appliance.boot import boot_order, default_entry, entry_filename
from edge.appliance.slots import Appliance, slot_state
from edge.appliance.update import run
from tests.conftest import REPO, edge_cli, write_config

OLD, NEW = "0.1.0", "0.2.0"
SLOT_BYTES = 1 << 20
HOST_PYTHON = "/usr/bin/python3"  # build.sh runs the manifest and entry modules with the host's python3, no venv


def _host(*args: str, cwd: Path = REPO) -> str:
    """A module of edge.appliance as image/build.sh runs it: host python3, PYTHONPATH=. only."""
    return subprocess.run([HOST_PYTHON, "-m", *args], cwd=cwd, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, check=True).stdout


def make_bundle(where: Path, version: str = NEW, root_bytes: int = 300_000) -> Path:
    """The slot's files, the manifest from build.sh's own command, and the real tar with build.sh's flags."""
    slot = where / f"slot-{version}"
    slot.mkdir(parents=True)
    (slot / "vmlinuz").write_bytes(os.urandom(7_000))
    (slot / "initrd.img").write_bytes(os.urandom(11_000))
    (slot / "root.squashfs").write_bytes(os.urandom(root_bytes))
    (slot / "manifest.json").write_text(_host("edge.appliance.bundle", str(slot), version, "abc123", str(SLOT_BYTES)))
    bundle = where / f"clinic-edge-{version}.update"
    subprocess.run(["tar", "--sort=name", "--owner=0", "--group=0", "--numeric-owner", "--mtime=@0", "-C", str(slot),
                    "-cf", str(bundle), "manifest.json", "vmlinuz", "initrd.img", "root.squashfs"], check=True)
    return bundle


@dataclass
class Box:
    """A flashed card in slot A, as build.sh lays it out, seen through EDGE_* paths."""

    env: dict[str, str]
    appliance: Appliance
    partition_b: Path

    def snapshot(self) -> dict[str, bytes]:
        """Every byte the update could touch: slot B's partition and every file on the ESP."""
        files = {str(p.relative_to(self.appliance.esp)): p.read_bytes() for p in self.appliance.esp.rglob("*") if p.is_file()}
        return {"partition-b": self.partition_b.read_bytes(), **files}

    def edge(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The ``edge`` command itself, as a field engineer runs it."""
        return subprocess.run([sys.executable, "-m", "edge", *args], capture_output=True, text=True, timeout=120, check=False,
                              env={**os.environ, **self.env})

    def update(self, bundle: Path, capsys: pytest.CaptureFixture[str], *, tries: int = 3) -> tuple[int, str, str]:
        """What ``edge update BUNDLE --no-reboot`` runs, in this process (the refusals are many; a CLI start each is slow)."""
        status = run(bundle, tries, reboot=False, appliance=self.appliance)
        out, err = capsys.readouterr()
        return status, out, err


@pytest.fixture
def box(tmp_path: Path) -> Box:
    root = tmp_path / "box"
    esp, parts = root / "esp", root / "by-partlabel"
    (esp / "loader" / "entries").mkdir(parents=True)
    (esp / "clinic-edge" / "a").mkdir(parents=True)
    parts.mkdir()
    (parts / "root-a").write_bytes(b"A" * SLOT_BYTES)
    (parts / "root-b").write_bytes(b"\xaa" * SLOT_BYTES)
    first = _host("edge.appliance.boot", "--slot", "a", "--version", OLD, "--filename").strip()
    (esp / "loader" / "entries" / first).write_text(_host("edge.appliance.boot", "--slot", "a", "--version", OLD))
    for name in ("vmlinuz", "initrd.img"):
        (esp / "clinic-edge" / "a" / name).write_bytes(b"old " + name.encode())
    (esp / "clinic-edge" / "a" / "manifest.json").write_text(json.dumps({"version": OLD}))
    (root / "cmdline").write_text("root=PARTLABEL=root-a rootfstype=squashfs ro edge.slot=a\n")
    (root / "version").write_text(OLD + "\n")
    env = {"EDGE_CMDLINE": str(root / "cmdline"), "EDGE_BOOT": str(esp), "EDGE_PARTITIONS": str(parts),
           "EDGE_VERSION_FILE": str(root / "version"), "EDGE_SLOT_STATE": str(root / "run" / "slots.json")}
    return Box(env, Appliance.from_env(env), parts / "root-b")


def test_the_image_first_entry_is_generation_one_of_slot_a() -> None:
    """What build.sh must name its entry (python3 -m edge.appliance.boot --filename)."""
    assert _host("edge.appliance.boot", "--slot", "a", "--version", OLD, "--filename").strip() == "clinic-edge-0001-a.conf"


@pytest.mark.parametrize(("entries", "boots"), [
    (["clinic-edge-0001-a.conf", "clinic-edge-0002-b+3.conf"], "clinic-edge-0002-b+3.conf"),  # a new update, untried
    (["clinic-edge-0001-a.conf", "clinic-edge-0002-b+1-2.conf"], "clinic-edge-0002-b+1-2.conf"),  # still has a try
    (["clinic-edge-0001-a.conf", "clinic-edge-0002-b+0-3.conf"], "clinic-edge-0001-a.conf"),  # tries used up: back
    (["clinic-edge-0001-a.conf", "clinic-edge-0002-b.conf"], "clinic-edge-0002-b.conf"),  # blessed
    (["clinic-edge-0003-a+3.conf", "clinic-edge-0002-b.conf"], "clinic-edge-0003-a+3.conf"),  # the next update, back in a
    (["clinic-edge-0009-a.conf", "clinic-edge-0010-b+3.conf"], "clinic-edge-0010-b+3.conf"),  # by number, not by text
    (["clinic-edge-a.conf", "clinic-edge-0002-b+3.conf"], "clinic-edge-0002-b+3.conf"),  # the early unnumbered name
])
def test_systemd_boot_v252_boots_the_update_while_it_has_tries_and_the_old_slot_after(entries: list[str], boots: str) -> None:
    assert default_entry(entries) == boots
    assert default_entry(list(reversed(entries))) == boots  # the order on the ESP does not matter
    assert boot_order(entries)[0] == boots


def test_a_good_bundle_goes_into_slot_b_with_three_tries(box: Box, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    before = box.snapshot()
    result = box.edge("update", str(bundle), "--no-reboot")
    assert result.returncode == 0, result.stderr
    assert "boot entry clinic-edge-0002-b+3.conf (3 tries, then back to slot a)" in result.stdout

    slot = tmp_path / f"slot-{NEW}"
    root = (slot / "root.squashfs").read_bytes()
    written = box.partition_b.read_bytes()
    assert written[: len(root)] == root
    assert written[len(root):] == before["partition-b"][len(root):]  # nothing past the root
    esp = box.appliance.esp
    for name in ("vmlinuz", "initrd.img", "manifest.json"):
        assert (esp / "clinic-edge" / "b" / name).read_bytes() == (slot / name).read_bytes()
    entries = sorted(p.name for p in (esp / "loader" / "entries").iterdir())
    assert entries == ["clinic-edge-0001-a.conf", "clinic-edge-0002-b+3.conf"]  # no temp files left
    entry = (esp / "loader" / "entries" / "clinic-edge-0002-b+3.conf").read_text()
    assert f"version {NEW}\n" in entry and "edge.slot=b" in entry and "root=PARTLABEL=root-b" in entry
    assert "sort-key" not in entry
    assert (esp / "loader" / "entries" / "clinic-edge-0001-a.conf").read_bytes() == before["loader/entries/clinic-edge-0001-a.conf"]
    assert (esp / "clinic-edge" / "a" / "vmlinuz").read_bytes() == before["clinic-edge/a/vmlinuz"]  # the way back untouched
    assert default_entry(entries) == "clinic-edge-0002-b+3.conf"

    state = slot_state(box.appliance)
    assert state is not None and state.update is not None
    assert (state.update.state, state.next_boot, state.other_version) == ("pending", "b", NEW)
    saved = json.loads(Path(box.env["EDGE_SLOT_STATE"]).read_text())  # for the sandboxed services
    assert saved["update"]["state"] == "pending" and saved["running_version"] == OLD


def test_the_next_update_replaces_a_failed_one_and_tries_allowed(box: Box, tmp_path: Path) -> None:
    entries = box.appliance.entries_dir
    (entries / "clinic-edge-0002-b+0-3.conf").write_text("title bad\nversion 0.1.5\nlinux /clinic-edge/b/vmlinuz\n")
    result = box.edge("update", str(make_bundle(tmp_path)), "--no-reboot", "--tries", "5")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in entries.iterdir()) == ["clinic-edge-0001-a.conf", "clinic-edge-0003-b+5.conf"]


def _member_offsets(bundle: Path) -> dict[str, tuple[int, int]]:
    with tarfile.open(bundle) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}


def _cuts(bundle: Path) -> list[int]:
    offsets = _member_offsets(bundle)
    root_data = offsets["root.squashfs"][1]
    return [0, 100, offsets["manifest.json"][1] + 10, offsets["vmlinuz"][0] + 200, offsets["initrd.img"][1] + 1,
            offsets["root.squashfs"][0], root_data + 150_000, root_data + 300_000 - 1]


@pytest.mark.parametrize("cut_index", range(8))
def test_a_truncated_bundle_is_refused_and_nothing_is_written(box: Box, tmp_path: Path, capsys: pytest.CaptureFixture[str], cut_index: int) -> None:
    bundle = make_bundle(tmp_path)
    cut = _cuts(bundle)[cut_index]
    short = tmp_path / "short.update"
    short.write_bytes(bundle.read_bytes()[:cut])
    before = box.snapshot()
    status, _, err = box.update(short, capsys)
    assert status == 1
    line = err.strip()
    assert line.startswith("edge update: bundle refused, nothing written: ") and "\n" not in line, err
    assert any(word in line for word in ("truncated", "empty", "not a Clinic Edge")), line
    assert "Traceback" not in err
    assert box.snapshot() == before


@pytest.mark.parametrize("where", ["manifest header", "manifest", "vmlinuz", "root start", "root end"])
def test_one_flipped_byte_is_refused_and_nothing_is_written(box: Box, tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str) -> None:
    bundle = make_bundle(tmp_path)
    offsets = _member_offsets(bundle)
    at = {"manifest header": 20, "manifest": offsets["manifest.json"][1] + 40, "vmlinuz": offsets["vmlinuz"][1] + 3_000,
          "root start": offsets["root.squashfs"][1], "root end": offsets["root.squashfs"][1] + 299_999}[where]
    data = bytearray(bundle.read_bytes())
    data[at] ^= 0x01
    bad = tmp_path / "bad.update"
    bad.write_bytes(bytes(data))
    before = box.snapshot()
    status, _, err = box.update(bad, capsys)
    assert status == 1
    assert err.startswith("edge update: bundle refused, nothing written: "), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert box.snapshot() == before


def test_a_root_bigger_than_the_slot_is_refused(box: Box, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    box.partition_b.write_bytes(b"\xaa" * 200_000)  # this card's slot is smaller than the build's
    before = box.snapshot()
    status, _, err = box.update(make_bundle(tmp_path), capsys)
    assert status == 1
    assert "root.squashfs is 300000 bytes, more than the slot's 200000" in err
    assert box.snapshot() == before


def test_the_bundle_is_read_from_a_device_without_relying_on_its_size(box: Box, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A USB stick holds the raw tar and then whatever was on it before: read up to the last slot file only."""
    bundle = make_bundle(tmp_path)
    stick = tmp_path / "stick.img"
    stick.write_bytes(bundle.read_bytes() + os.urandom(64 * 1024))
    status, _, err = box.update(stick, capsys)
    assert status == 0, err


def test_an_update_waits_while_the_running_slot_is_on_trial(box: Box, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    entries = box.appliance.entries_dir
    (entries / "clinic-edge-0001-a.conf").rename(entries / "clinic-edge-0001-a+2-1.conf")
    before = box.snapshot()
    status, _, err = box.update(make_bundle(tmp_path), capsys)
    assert status == 1 and "still on trial" in err
    assert box.snapshot() == before


def test_off_the_appliance_update_says_so(tmp_path: Path) -> None:
    (tmp_path / "cmdline").write_text("BOOT_IMAGE=/vmlinuz root=/dev/sda1 quiet\n")
    result = subprocess.run([sys.executable, "-m", "edge", "update", str(tmp_path / "x.update"), "--no-reboot"],
                            capture_output=True, text=True, check=False, env={**os.environ, "EDGE_CMDLINE": str(tmp_path / "cmdline")})
    assert result.returncode == 1
    assert "not running on the appliance: no edge.slot=" in result.stderr


def _failed_update(box: Box, tmp_path: Path) -> None:
    """Slot B got 0.2.0, it never came up three times, systemd-boot went back to slot A."""
    assert box.edge("update", str(make_bundle(tmp_path)), "--no-reboot").returncode == 0
    entries = box.appliance.entries_dir
    (entries / "clinic-edge-0002-b+3.conf").rename(entries / "clinic-edge-0002-b+0-3.conf")


def test_slot_state_reads_a_failed_update(box: Box, tmp_path: Path) -> None:
    _failed_update(box, tmp_path)
    state = slot_state(box.appliance)
    assert state is not None and state.failed
    assert state.summary == f"update to {NEW} failed (slot b, 3 tries); running {OLD} in slot a"
    assert state.next_boot == "a"
    off = Appliance.from_env({**box.env, "EDGE_CMDLINE": str(tmp_path / "none"), "EDGE_SLOT_STATE": str(tmp_path / "none")})
    assert slot_state(off) is None  # off the appliance


def test_the_services_read_the_state_root_wrote(box: Box, tmp_path: Path) -> None:
    """Under their sandbox the services see neither /proc/cmdline nor the ESP: the state file speaks for them."""
    _failed_update(box, tmp_path)
    subprocess.run([sys.executable, "-m", "edge.appliance.slots", "--write"], env={**os.environ, **box.env}, check=True,
                   capture_output=True)
    sandboxed = Appliance.from_env({**box.env, "EDGE_CMDLINE": str(tmp_path / "hidden"), "EDGE_BOOT": str(tmp_path / "no-esp")})
    state = slot_state(sandboxed)
    assert state is not None and state.source == "state-file" and state.failed
    assert state.summary == f"update to {NEW} failed (slot b, 3 tries); running {OLD} in slot a"


def test_status_healthz_and_heartbeat_show_the_slot_and_the_failed_update(
    box: Box, tmp_path: Path, node_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _failed_update(box, tmp_path)
    for key, value in box.env.items():
        monkeypatch.setenv(key, value)
    config = write_config(tmp_path / "edge.toml", tmp_path / "var", ops={"zeroconf": False, "textfile_dir": str(tmp_path / "prom")})
    failed = f"update to {NEW} failed (slot b, 3 tries); running {OLD} in slot a"

    # edge status, for the technician and the field engineer
    text = edge_cli(config, "status").stdout
    assert f"PROBLEM   {failed}" in text
    status = json.loads(edge_cli(config, "status", "--json").stdout)["appliance"]
    assert (status["running_slot"], status["running_version"], status["other_version"]) == ("a", OLD, NEW)
    assert status["update"]["state"] == "failed" and status["summary"] == failed

    # /healthz and /metrics of a running node: degraded, not failing (the old slot works)
    node = node_factory(("serve", "dicom", "console"), ops={"zeroconf": False}).start()
    with urllib.request.urlopen(f"http://127.0.0.1:{node.console_port}/healthz", timeout=10) as response:
        body = json.loads(response.read())
        assert response.status == 200
    assert body["status"] == "degraded"
    assert body["checks"]["update"] == {"ok": False, "critical": False, "detail": failed}
    assert body["appliance"]["running_slot"] == "a" and body["appliance"]["failed"] is True

    # the heartbeat (the same registry is pushed to the Pushgateway and written to the textfile)
    import asyncio

    from edge.node.config import load_config
    from edge.ops.heartbeat import Heartbeat
    from edge.store.db import open_database

    loaded = load_config(config)
    open_database(loaded.data_dir)
    asyncio.run(Heartbeat(loaded).beat())
    families = {f.name: f for f in text_string_to_metric_families((tmp_path / "prom" / "clinic_edge.prom").read_text())}
    info = families["edge_appliance_slot_info"].samples[0].labels
    assert (info["running_slot"], info["running_version"], info["other_version"], info["next_boot"]) == ("a", OLD, NEW, "a")
    sample = families["edge_update_failed"].samples[0]
    assert sample.value == 1.0 and sample.labels == {"slot": "b", "version": NEW, "tries": "3"}
    checks = {s.labels["check"]: s.value for s in families["edge_health_check_ok"].samples}
    assert checks["update"] == 0.0


def test_status_after_a_good_update_shows_the_new_slot_running(box: Box, tmp_path: Path) -> None:
    assert box.edge("update", str(make_bundle(tmp_path)), "--no-reboot").returncode == 0
    # The box reboots into slot b; the node comes up and systemd-bless-boot drops the counter.
    entries = box.appliance.entries_dir
    (entries / entry_filename("b", 2, 3)).rename(entries / entry_filename("b", 2))
    Path(box.env["EDGE_CMDLINE"]).write_text("root=PARTLABEL=root-b ro edge.slot=b\n")
    Path(box.env["EDGE_VERSION_FILE"]).write_text(NEW + "\n")
    state = slot_state(box.appliance)
    assert state is not None and state.update is None
    assert state.summary == f"running {NEW} in slot b; slot a holds {OLD}"
    assert state.next_boot == "b"
    digest = hashlib.sha256((tmp_path / f"slot-{NEW}" / "root.squashfs").read_bytes()).hexdigest()
    assert json.loads((box.appliance.slot_dir("b") / "manifest.json").read_text())["files"]["root.squashfs"]["sha256"] == digest
