"""A box's updates, under real systemd-boot and systemd in QEMU: refused, cut, good, rolled back.

In order, on the card test_box.py provisioned, as a box lives them: a corrupt and a truncated bundle are refused
with the reason and leave the other slot and the ESP as they were; the power goes while an
update writes the other slot, and the box still boots its old slot; a good update (the
built root with a new version) reboots the box into the other slot, and status, /healthz
and /metrics say so, with the clinic's study still there; an update whose DICOM service
cannot start (a drop-in ``ExecStart=/bin/false``) is tried once, fails the boot check, and
systemd-boot goes back to the good slot by itself, the failed attempt shown everywhere.

Bundles reach the box as read-only virtio disks (``/dev/disk/by-id/virtio-<serial>``), as a
USB stick would: ``edge update`` reads the raw tar from the block device. The good and
broken bundles are made from the built one (unsquashfs, change, mksquashfs, build.sh's
manifest and tar), in the background from the start of the run. The box is the one
test_box.py lived with (tests/appliance/box.py): its clinic data must come through every update.
"""

from __future__ import annotations

import json
import re
import shlex
import tarfile
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from tests.appliance.box import (
    CONFIG,
    GUEST_EDGE,
    REBOOT_TIMEOUT,
    Box,
    series,
    stick,
    store,
)

pytestmark = [pytest.mark.appliance, pytest.mark.timeout(2700)]


def test_a_corrupt_or_truncated_bundle_is_refused_and_nothing_changes(box: Box, tmp_path: Path) -> None:
    box.ensure_up(tmp_path)  # as test_box.py left it (or provisioned and first-booted now, if run alone)
    # A study the clinic has on the box before any update.
    box.study_uid = generate_uid()
    files = series(tmp_path / "before", 2, box.study_uid, 71)
    assert len(store(box, files)) == 2
    assert box.study_uid in {s["study_instance_uid"] for s in box.studies()}

    before = (box.slots(), box.esp_listing(), box.root_b_head())
    assert before[0]["running_slot"] == "a" and before[0]["update"] is None
    for name, reason in (("corrupt", r"root\.squashfs does not match its SHA-256.*corrupt"),
                         ("truncated", r"truncated")):
        run = box.guest(f"{GUEST_EDGE} update {stick(name)} --no-reboot", 600)
        print(f"{name}: rc={run.returncode} {run.stderr.strip()}")
        assert run.returncode == 1, f"the {name} bundle was not refused: {run.stdout}{run.stderr}"
        assert re.search(r"bundle refused, nothing written: .*" + reason, run.stderr), run.stderr
        assert "writing slot" not in run.stdout
        assert (box.slots(), box.esp_listing(), box.root_b_head()) == before, f"the {name} bundle changed something"


def test_power_cut_while_an_update_writes_boots_the_old_slot(box: Box) -> None:
    box.start_update(stick("real"), "--no-reboot")
    _, checking = box.wait_log(r"checking ")
    _, whole = box.wait_log(r"is whole")
    box.wait_log(r"writing slot b")
    check_s = whole - checking
    # Writing reads the bundle again and writes as much: it takes longer than the check did.
    delay = box.rng.uniform(0.0, check_s * 0.9)
    print(f"check took {check_s:.1f} s; power cut {delay:.1f} s into writing slot b")
    box.figures["update check (bundle read and hashed)"] = f"{check_s:.0f} s"
    time.sleep(delay)
    last = box.update_log() or ""
    box.power_cut()
    assert "slot b holds" not in last, f"the power cut came after the update finished: {last}"

    box.power_on(every_stick=True)
    seconds = box.wait_echo(REBOOT_TIMEOUT)
    box.figures["power on after the cut during an update -> C-ECHO"] = f"{seconds:.0f} s"
    assert box.running_slot() == "a"
    state = box.slots()
    assert state["running_slot"] == "a" and state["next_boot"] == "a", state
    with tarfile.open(box.bundles["real"]) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    size, sha = manifest["files"]["root.squashfs"]["size"], manifest["files"]["root.squashfs"]["sha256"]
    on_b = box.guest_ok(f"head -c {size} /dev/disk/by-partlabel/root-b | sha256sum").split()[0]
    b_entries = [e for e in state["entries"] if re.match(r"clinic-edge-\d+-b", e)]
    print(f"after the cut: entries {state['entries']}, root-b {'complete' if on_b == sha else 'half-written'}")
    if b_entries:  # only if the cut came after the entry: then slot b must be whole
        assert on_b == sha, f"a half-written slot b has a boot entry: {b_entries}"
    else:
        assert not box.guest_ok("ls /boot/efi/clinic-edge/b 2>/dev/null | grep -v '\\.tmp$' | grep manifest || true").strip(), \
            "a half-written slot b must not look installed"
    assert box.study_uid in {s["study_instance_uid"] for s in box.studies()}


def test_a_good_update_reboots_into_the_other_slot_and_says_so(box: Box) -> None:
    assert "next" in box.bundles, "the next bundle should have been attached at this power on"
    new = f"{box.version}-next"
    mark = box.serial_mark()
    started = time.monotonic()
    box.start_update(stick("next"))
    log, rebooting = box.wait_log(r"rebooting into the update")
    assert f"slot b holds {new}" in log and "3 tries" in log, log
    box.figures["good update: edge update start -> written, rebooting"] = f"{rebooting - started:.0f} s"
    box.wait_serial_after(mark, r"Command line: .*edge\.slot=b")
    seconds = box.wait_echo_now()
    box.figures["good update: reboot -> C-ECHO in slot b"] = f"{time.monotonic() - rebooting:.0f} s"
    print(f"update written in {rebooting - started:.0f} s, node up in slot b {seconds:.0f} s after that")
    assert box.running_slot() == "b"
    state = box.wait_blessed()
    assert state["running_slot"] == "b" and state["running_version"] == new and state["update"] is None, state
    assert state["other_version"] == box.version and state["next_boot"] == "b", state

    status = json.loads(box.guest_ok(f"{GUEST_EDGE} --config {CONFIG} status --json", 240))
    assert status["appliance"]["running_slot"] == "b" and status["appliance"]["running_version"] == new
    human = box.guest_ok(f"{GUEST_EDGE} --config {CONFIG} status", 240)
    assert f"running {new} in slot b" in human and "PROBLEM " not in human.split("\n")[1], human
    code, body = box.http("/healthz")
    health = json.loads(body)
    assert code == 200 and health["appliance"]["running_slot"] == "b" and health["appliance"]["running_version"] == new, body
    assert health["checks"]["update"]["ok"], health["checks"]["update"]
    metrics = box.metrics()
    (labels, _), = metrics["edge_appliance_slot_info"]
    assert labels["running_slot"] == "b" and labels["running_version"] == new, labels
    assert not [v for _, v in metrics.get("edge_update_failed", []) if v]
    # The clinic's data and config came through.
    assert box.study_uid in {s["study_instance_uid"] for s in box.studies()}
    assert 'id = "clinic-0042"' in box.guest_ok(f"cat {CONFIG}")


def test_a_broken_update_is_rolled_back_to_the_old_slot_by_itself(box: Box) -> None:
    good = f"{box.version}-next"
    broken = f"{box.version}-broken"
    mark = box.serial_mark()
    started = time.monotonic()
    box.start_update(stick("broken"), "--tries", "1")
    log, rebooting = box.wait_log(r"rebooting into the update")
    assert f"slot a holds {broken}" in log and "1 tries" in log, log
    # The broken slot boots, its boot check fails, the box reboots, systemd-boot picks slot b.
    text = box.wait_serial_after(mark, r"Command line: .*edge\.slot=a")
    tried = time.monotonic()
    text = box.wait_serial_after(mark, r"Command line: .*edge\.slot=", count=2, timeout=2 * REBOOT_TIMEOUT)
    back = time.monotonic()
    lines = re.findall(r"Command line: .*edge\.slot=([ab])", text)
    assert lines[:2] == ["a", "b"], f"boots after the broken update: {lines}"
    seconds = box.wait_echo_now()
    up = time.monotonic()
    rollback = up - rebooting
    box.figures["broken update: reboot -> broken slot tried -> back in slot b -> C-ECHO (rollback)"] = (
        f"{rollback:.0f} s; {up - started:.0f} s from edge update (broken slot's boot {back - tried:.0f} s, good slot's boot to C-ECHO {up - back:.0f} s)")
    print(f"rollback took {rollback:.0f} s from edge update's reboot to C-ECHO in the old slot ({seconds:.0f} s after the last boot began)")
    print("broken slot's boot check on the console:", re.findall(r"\S*Failed to start \S*edge-boot-check\S*", text) or "not shown")
    assert box.running_slot() == "b"

    state = box.slots()
    assert state["running_slot"] == "b" and state["running_version"] == good and state["failed"], state
    assert state["update"]["state"] == "failed" and state["update"]["slot"] == "a" and state["update"]["version"] == broken, state
    assert state["next_boot"] == "b", state
    status = json.loads(box.guest_ok(f"{GUEST_EDGE} --config {CONFIG} status --json", 240))
    assert status["appliance"]["failed"] and status["appliance"]["update"]["version"] == broken, status["appliance"]
    human = box.guest_ok(f"{GUEST_EDGE} --config {CONFIG} status", 240)
    assert re.search(rf"PROBLEM\s+update to {re.escape(broken)} failed \(slot a, 1 tries\); running {re.escape(good)} in slot b", human), human
    code, body = box.http("/healthz")
    health = json.loads(body)
    assert code == 200 and health["status"] == "degraded", body
    assert not health["checks"]["update"]["ok"] and broken in health["checks"]["update"]["detail"], health
    metrics = box.metrics()
    failed = [(labels, v) for labels, v in metrics["edge_update_failed"] if v == 1]
    assert failed and failed[0][0]["slot"] == "a" and failed[0][0]["version"] == broken, metrics["edge_update_failed"]
    (labels, _), = metrics["edge_appliance_slot_info"]
    assert labels["running_slot"] == "b" and labels["running_version"] == good
    # Data and config intact, and the node works: one more study goes in.
    assert box.study_uid in {s["study_instance_uid"] for s in box.studies()}
    assert 'id = "clinic-0042"' in box.guest_ok(f"cat {CONFIG}")
    print(shlex.join(["boots:", *lines]))
