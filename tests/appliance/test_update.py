"""A box's updates, under real systemd-boot and systemd in QEMU: refused, cut, good, rolled back.

In order, on one card, as a box lives them: a corrupt and a truncated bundle are refused
with the reason and leave the other slot and the ESP as they were; the power goes while an
update writes the other slot, and the box still boots its old slot; a good update (the
built root with a new version) reboots the box into the other slot, and status, /healthz
and /metrics say so, with the clinic's study still there; an update whose DICOM service
cannot start (a drop-in ``ExecStart=/bin/false``) is tried once, fails the boot check, and
systemd-boot goes back to the good slot by itself, the failed attempt shown everywhere.

Bundles reach the box as read-only virtio disks (``/dev/disk/by-id/virtio-<serial>``), as a
USB stick would: ``edge update`` reads the raw tar from the block device. The good and
broken bundles are made from the built one (unsquashfs, change, mksquashfs, build.sh's
manifest and tar), in the background while the box's first boot runs.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import shlex
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid

from tests.appliance.conftest import REPO, BuiltImage
from tests.appliance.test_box import (
    EDGE,
    GUEST_EDGE,
    Box,
    _kill_seed,
    _series,
    _store,
    provisioning,
)
from tests.appliance.vm import FIGURES, ApplianceVM, GuestAgentError, free_port
from tests.peers.fault_proxy import FaultProxy
from tests.peers.orthanc import OrthancPeer

pytestmark = [pytest.mark.appliance, pytest.mark.timeout(2700)]

SLOT_BYTES = 768 * 1024 * 1024
"""build.sh's SLOT_MB: the manifest's slot_bytes."""
GUEST_PY = "/opt/clinic-edge/venv/bin/python"
CONFIG = "/etc/clinic-edge/edge.toml"
DISKS = ("real", "corrupt", "truncated", "next", "broken")
"""Attached in this order: /dev/disk/by-id/virtio-extra<i>."""
LOG = "/run/edge-test-update.log"
FIRST_BOOT_TIMEOUT = 1200.0
"""First boot formats the data partition (argon2id); measured 330 s to luksFormat under TCG on a 2-core box at load 15."""
REBOOT_TIMEOUT = 900.0


def stick(name: str) -> str:
    return f"/dev/disk/by-id/virtio-extra{DISKS.index(name)}"


# --- bundles made from the built one ---------------------------------------------------------


def _members(bundle: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(bundle) as tar:
        return {m.name.removeprefix("./"): m for m in tar.getmembers()}


def corrupt_bundle(real: Path, out: Path) -> Path:
    """One byte flipped in the middle of root.squashfs (the manifest still says the old SHA-256)."""
    subprocess.run(["cp", "--sparse=always", str(real), str(out)], check=True)
    root = _members(real)["root.squashfs"]
    where = root.offset_data + root.size // 2
    with out.open("r+b") as f:
        f.seek(where)
        byte = f.read(1)
        f.seek(where)
        f.write(bytes([byte[0] ^ 0xFF]))
    return out


def truncated_bundle(real: Path, out: Path) -> Path:
    """The first half, as a copy cut short by a pulled stick."""
    subprocess.run(["head", "-c", str(real.stat().st_size // 2 // 512 * 512)], stdin=real.open("rb"), stdout=out.open("wb"), check=True)
    return out


def _squash_and_tar(root: Path, slot: Path, version: str, commit: str, out: Path) -> Path:
    """build.sh step 3: mksquashfs, the manifest by edge.appliance.bundle, the same tar.

    lz4, not build.sh's zstd: a test bundle is made beside a running VM, and lz4 squashes the
    root in seconds where zstd takes minutes on two busy cores (the kernel reads both).
    """
    (slot / "root.squashfs").unlink(missing_ok=True)
    subprocess.run(["mksquashfs", str(root), str(slot / "root.squashfs"), "-comp", "lz4", "-noappend", "-quiet",
                    "-no-progress", "-no-xattrs", "-processors", "2"], check=True)
    manifest = subprocess.run(["python3", "-m", "edge.appliance.bundle", str(slot), version, commit, str(SLOT_BYTES)],
                              cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=True)
    (slot / "manifest.json").write_text(manifest.stdout)
    subprocess.run(["tar", "--sort=name", "--owner=0", "--group=0", "--numeric-owner", "-C", str(slot), "-cf", f"{out}.tmp",
                    "manifest.json", "vmlinuz", "initrd.img", "root.squashfs"], check=True)
    os.replace(f"{out}.tmp", out)
    return out


def variant_bundles(real: Path, version: str, work: Path) -> dict[str, Path]:
    """"next": the same root as version ``<v>-next``; "broken": ``<v>-broken`` whose edge-dicom cannot start.

    With EDGE_UPDATE_BUNDLE_CACHE=DIR (developers) they are kept there per built bundle and reused.
    """
    cache = os.environ.get("EDGE_UPDATE_BUNDLE_CACHE")
    if cache:
        with real.open("rb") as f:
            digest = hashlib.sha256(f.read(1 << 16)).hexdigest()[:16]  # the manifest, with every file's SHA-256
        work = Path(cache) / digest
        found = {name: work / f"clinic-edge-{version}-{name}.update" for name in ("next", "broken")}
        if all(p.exists() for p in found.values()):
            return found
        subprocess.run(["rm", "-rf", str(work)], check=True)
    started = time.monotonic()
    slot, root = work / "slot", work / "root"
    slot.mkdir(parents=True)
    subprocess.run(["tar", "-C", str(slot), "-xf", str(real), "vmlinuz", "initrd.img", "root.squashfs", "manifest.json"], check=True)
    commit = json.loads((slot / "manifest.json").read_text())["commit"]
    subprocess.run(["unsquashfs", "-q", "-n", "-no-xattrs", "-d", str(root), str(slot / "root.squashfs")], check=True,
                   stdout=subprocess.DEVNULL)
    out = {}
    (root / "usr/lib/clinic-edge/version").write_text(f"{version}-next\n")
    out["next"] = _squash_and_tar(root, slot, f"{version}-next", commit, work / f"clinic-edge-{version}-next.update")
    dropin = root / "etc/systemd/system/edge-dicom.service.d/broken.conf"
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text("[Service]\nExecStart=\nExecStart=/bin/false\n")
    (root / "usr/lib/clinic-edge/version").write_text(f"{version}-broken\n")
    out["broken"] = _squash_and_tar(root, slot, f"{version}-broken", commit, work / f"clinic-edge-{version}-broken.update")
    subprocess.run(["rm", "-rf", str(root), str(slot)], check=True)
    print(f"\nbundles next and broken made in {time.monotonic() - started:.0f} s")
    return out


# --- the box -------------------------------------------------------------------------------


class UpdateBox(Box):
    bundles: dict[str, Path]
    variants: concurrent.futures.Future[dict[str, Path]]
    version: str
    study_uid: str
    """A study stored before any update: it must outlive every one."""

    def power_on_with_sticks(self) -> None:
        """The first power on gets the bundles made already; every later one all of them."""
        disks = [self.bundles["real"], self.bundles["corrupt"], self.bundles["truncated"]]
        if self.vm.boots:
            self.bundles.update(self.variants.result())
            disks += [self.bundles["next"], self.bundles["broken"]]
        self.power_on(tuple(disks))

    def slots(self) -> dict[str, Any]:
        """What root reads from the ESP (python -m edge.appliance.slots --json)."""
        return dict(json.loads(self.guest_ok(f"{GUEST_PY} -m edge.appliance.slots --json")))

    def esp_listing(self) -> str:
        return self.guest_ok("cd /boot/efi && find loader/entries clinic-edge -type f | sort | xargs sha256sum")

    def root_b_head(self, mb: int = 64) -> str:
        return self.guest_ok(f"head -c {mb}M /dev/disk/by-partlabel/root-b | sha256sum").split()[0]

    def running_slot(self) -> str:
        return re.search(r"edge\.slot=([ab])", self.guest_ok("cat /proc/cmdline")).group(1)  # type: ignore[union-attr]

    def start_update(self, bundle: str, *options: str) -> None:
        """``edge update`` as a transient unit, so the agent returns and the reboot is the box's own."""
        self.guest_ok(f"rm -f {LOG}; systemctl reset-failed edge-test-update 2>/dev/null; "
                      f"systemd-run --unit edge-test-update -E PYTHONUNBUFFERED=1 -p StandardOutput=file:{LOG} "
                      f"-p StandardError=file:{LOG}.err {GUEST_EDGE} update {bundle} {' '.join(options)}")

    def update_log(self) -> str | None:
        """The update's output so far; None while the box does not answer (rebooting)."""
        try:
            run = self.vm.agent.sh(f"cat {LOG} {LOG}.err 2>/dev/null", timeout=20)
        except (GuestAgentError, OSError, TimeoutError, ValueError):
            return None
        return run.stdout

    def wait_log(self, pattern: str, timeout: float = 600.0) -> tuple[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            log = self.update_log() or ""
            if re.search(pattern, log):
                return log, time.monotonic()
            assert time.monotonic() < deadline, f"edge update never said {pattern!r}:\n{log}"
            time.sleep(0.5)

    def serial_mark(self) -> int:
        return len(self.vm.serial())

    def wait_serial_after(self, mark: int, pattern: str, count: int = 1, timeout: float = REBOOT_TIMEOUT) -> str:
        """Until ``pattern`` appeared ``count`` times on the console after ``mark`` (reboots keep QEMU running)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.vm.serial()[mark:]
            if len(re.findall(pattern, text)) >= count:
                return text
            assert self.vm.running(), f"the box powered off:\n{text[-3000:]}"
            assert time.monotonic() < deadline, f"{pattern!r} x{count} not on the console within {timeout:.0f} s:\n{text[-4000:]}"
            time.sleep(1)

    def wait_echo_now(self, timeout: float = REBOOT_TIMEOUT) -> float:
        """Until C-ECHO is answered; seconds from now (not from power on)."""
        started = time.monotonic()
        self.wait_echo(timeout)
        return time.monotonic() - started

    def wait_blessed(self, timeout: float = 300.0) -> dict[str, Any]:
        """Until systemd-bless-boot has marked this boot good and slots.json says so."""
        deadline = time.monotonic() + timeout
        while True:
            state = json.loads(self.guest_ok("cat /run/clinic-edge/slots.json"))
            if not state.get("update") or state["update"]["state"] == "failed":
                return dict(state)
            if time.monotonic() > deadline:
                why = self.guest("systemctl status --no-pager systemd-bless-boot boot-complete.target edge-boot-check 2>&1; "
                                 "ls /boot/efi/loader/entries").stdout
                raise AssertionError(f"this boot was never marked good: {state}\n{why}")
            time.sleep(3)

    def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        status, text = self.http("/metrics")
        assert status == 200, text[:500]
        found: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
        return found


@pytest.fixture(scope="module")
def ubox(built_image: BuiltImage, cloud: tuple[OrthancPeer, FaultProxy], tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpdateBox]:
    orthanc, proxy = cloud
    workdir = tmp_path_factory.mktemp("ubox")
    disk = workdir / "card.img"
    subprocess.run(["cp", "--sparse=always", str(built_image.img), str(disk)], check=True)
    subprocess.run(["truncate", "-s", "+6G", str(disk)], check=True)
    dr_port = free_port()
    dr = subprocess.Popen(["storescp", "-aet", "DR1", str(dr_port)], cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    provision = workdir / "node.toml"
    provision.write_text(provisioning(dr_port, proxy.port))
    shown = subprocess.run([EDGE, "provision", "--image-file", str(disk), "--from-file", str(provision)], capture_output=True, text=True, check=False)
    assert shown.returncode == 0, shown.stderr
    vm = ApplianceVM(disk, workdir / "vm", host_services=(proxy.port, dr_port))
    b = UpdateBox(workdir, disk, built_image, orthanc, proxy, dr_port, vm, _kill_seed())
    b.version = built_image.version
    b.bundles = {
        "real": built_image.update,
        "corrupt": corrupt_bundle(built_image.update, workdir / "corrupt.update"),
        "truncated": truncated_bundle(built_image.update, workdir / "truncated.update"),
    }
    pool = concurrent.futures.ThreadPoolExecutor(1)
    b.variants = pool.submit(variant_bundles, built_image.update, built_image.version, workdir / "variants")
    try:
        yield b
    finally:
        FIGURES.update(b.figures)
        vm.close()
        dr.kill()
        pool.shutdown(wait=True)


# --- the box's life ------------------------------------------------------------------------


def test_a_corrupt_or_truncated_bundle_is_refused_and_nothing_changes(ubox: UpdateBox, tmp_path: Path) -> None:
    ubox.power_on_with_sticks()
    seconds = ubox.wait_echo(FIRST_BOOT_TIMEOUT)
    ubox.figures["first boot: power on -> C-ECHO"] = f"{seconds:.0f} s ({ubox.vm.accel})"
    # A study the clinic has on the box before any update.
    files = _series(tmp_path / "before", 2, generate_uid(), 71)
    assert len(_store(ubox, files)) == 2
    ubox.study_uid = next(iter(ubox.studies()))["study_instance_uid"]

    before = (ubox.slots(), ubox.esp_listing(), ubox.root_b_head())
    assert before[0]["running_slot"] == "a" and before[0]["update"] is None
    for name, reason in (("corrupt", r"root\.squashfs does not match its SHA-256.*corrupt"),
                         ("truncated", r"truncated")):
        run = ubox.guest(f"{GUEST_EDGE} update {stick(name)} --no-reboot", 600)
        print(f"{name}: rc={run.returncode} {run.stderr.strip()}")
        assert run.returncode == 1, f"the {name} bundle was not refused: {run.stdout}{run.stderr}"
        assert re.search(r"bundle refused, nothing written: .*" + reason, run.stderr), run.stderr
        assert "writing slot" not in run.stdout
        assert (ubox.slots(), ubox.esp_listing(), ubox.root_b_head()) == before, f"the {name} bundle changed something"


def test_power_cut_while_an_update_writes_boots_the_old_slot(ubox: UpdateBox) -> None:
    ubox.start_update(stick("real"), "--no-reboot")
    _, checking = ubox.wait_log(r"checking ")
    _, whole = ubox.wait_log(r"is whole")
    ubox.wait_log(r"writing slot b")
    check_s = whole - checking
    # Writing reads the bundle again and writes as much: it takes longer than the check did.
    delay = ubox.rng.uniform(0.0, check_s * 0.9)
    print(f"check took {check_s:.1f} s; power cut {delay:.1f} s into writing slot b")
    ubox.figures["update check (bundle read and hashed)"] = f"{check_s:.0f} s"
    time.sleep(delay)
    last = ubox.update_log() or ""
    ubox.power_cut()
    assert "slot b holds" not in last, f"the power cut came after the update finished: {last}"

    ubox.power_on_with_sticks()
    seconds = ubox.wait_echo(REBOOT_TIMEOUT)
    ubox.figures["power on after the cut during an update -> C-ECHO"] = f"{seconds:.0f} s"
    assert ubox.running_slot() == "a"
    state = ubox.slots()
    assert state["running_slot"] == "a" and state["next_boot"] == "a", state
    with tarfile.open(ubox.bundles["real"]) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    size, sha = manifest["files"]["root.squashfs"]["size"], manifest["files"]["root.squashfs"]["sha256"]
    on_b = ubox.guest_ok(f"head -c {size} /dev/disk/by-partlabel/root-b | sha256sum").split()[0]
    b_entries = [e for e in state["entries"] if re.match(r"clinic-edge-\d+-b", e)]
    print(f"after the cut: entries {state['entries']}, root-b {'complete' if on_b == sha else 'half-written'}")
    if b_entries:  # only if the cut came after the entry: then slot b must be whole
        assert on_b == sha, f"a half-written slot b has a boot entry: {b_entries}"
    else:
        assert not ubox.guest_ok("ls /boot/efi/clinic-edge/b 2>/dev/null | grep -v '\\.tmp$' | grep manifest || true").strip(), \
            "a half-written slot b must not look installed"
    assert ubox.study_uid in {s["study_instance_uid"] for s in ubox.studies()}


def test_a_good_update_reboots_into_the_other_slot_and_says_so(ubox: UpdateBox) -> None:
    assert "next" in ubox.bundles, "the next bundle should have been attached at this power on"
    new = f"{ubox.version}-next"
    mark = ubox.serial_mark()
    started = time.monotonic()
    ubox.start_update(stick("next"))
    log, rebooting = ubox.wait_log(r"rebooting into the update")
    assert f"slot b holds {new}" in log and "3 tries" in log, log
    ubox.figures["good update: edge update start -> written, rebooting"] = f"{rebooting - started:.0f} s"
    ubox.wait_serial_after(mark, r"Command line: .*edge\.slot=b")
    seconds = ubox.wait_echo_now()
    ubox.figures["good update: reboot -> C-ECHO in slot b"] = f"{time.monotonic() - rebooting:.0f} s"
    print(f"update written in {rebooting - started:.0f} s, node up in slot b {seconds:.0f} s after that")
    assert ubox.running_slot() == "b"
    state = ubox.wait_blessed()
    assert state["running_slot"] == "b" and state["running_version"] == new and state["update"] is None, state
    assert state["other_version"] == ubox.version and state["next_boot"] == "b", state

    status = json.loads(ubox.guest_ok(f"{GUEST_EDGE} --config {CONFIG} status --json", 240))
    assert status["appliance"]["running_slot"] == "b" and status["appliance"]["running_version"] == new
    human = ubox.guest_ok(f"{GUEST_EDGE} --config {CONFIG} status", 240)
    assert f"running {new} in slot b" in human and "PROBLEM " not in human.split("\n")[1], human
    code, body = ubox.http("/healthz")
    health = json.loads(body)
    assert code == 200 and health["appliance"]["running_slot"] == "b" and health["appliance"]["running_version"] == new, body
    assert health["checks"]["update"]["ok"], health["checks"]["update"]
    metrics = ubox.metrics()
    (labels, _), = metrics["edge_appliance_slot_info"]
    assert labels["running_slot"] == "b" and labels["running_version"] == new, labels
    assert not [v for _, v in metrics.get("edge_update_failed", []) if v]
    # The clinic's data and config came through.
    assert ubox.study_uid in {s["study_instance_uid"] for s in ubox.studies()}
    assert 'id = "clinic-0042"' in ubox.guest_ok(f"cat {CONFIG}")


def test_a_broken_update_is_rolled_back_to_the_old_slot_by_itself(ubox: UpdateBox) -> None:
    good = f"{ubox.version}-next"
    broken = f"{ubox.version}-broken"
    mark = ubox.serial_mark()
    started = time.monotonic()
    ubox.start_update(stick("broken"), "--tries", "1")
    log, rebooting = ubox.wait_log(r"rebooting into the update")
    assert f"slot a holds {broken}" in log and "1 tries" in log, log
    # The broken slot boots, its boot check fails, the box reboots, systemd-boot picks slot b.
    text = ubox.wait_serial_after(mark, r"Command line: .*edge\.slot=a")
    tried = time.monotonic()
    text = ubox.wait_serial_after(mark, r"Command line: .*edge\.slot=", count=2, timeout=2 * REBOOT_TIMEOUT)
    back = time.monotonic()
    lines = re.findall(r"Command line: .*edge\.slot=([ab])", text)
    assert lines[:2] == ["a", "b"], f"boots after the broken update: {lines}"
    seconds = ubox.wait_echo_now()
    up = time.monotonic()
    rollback = up - rebooting
    ubox.figures["broken update: reboot -> broken slot tried -> back in slot b -> C-ECHO (rollback)"] = (
        f"{rollback:.0f} s; {up - started:.0f} s from edge update (broken slot's boot {back - tried:.0f} s, good slot's boot to C-ECHO {up - back:.0f} s)")
    print(f"rollback took {rollback:.0f} s from edge update's reboot to C-ECHO in the old slot ({seconds:.0f} s after the last boot began)")
    print("broken slot's boot check on the console:", re.findall(r"\S*Failed to start \S*edge-boot-check\S*", text) or "not shown")
    assert ubox.running_slot() == "b"

    state = ubox.slots()
    assert state["running_slot"] == "b" and state["running_version"] == good and state["failed"], state
    assert state["update"]["state"] == "failed" and state["update"]["slot"] == "a" and state["update"]["version"] == broken, state
    assert state["next_boot"] == "b", state
    status = json.loads(ubox.guest_ok(f"{GUEST_EDGE} --config {CONFIG} status --json", 240))
    assert status["appliance"]["failed"] and status["appliance"]["update"]["version"] == broken, status["appliance"]
    human = ubox.guest_ok(f"{GUEST_EDGE} --config {CONFIG} status", 240)
    assert re.search(rf"PROBLEM\s+update to {re.escape(broken)} failed \(slot a, 1 tries\); running {re.escape(good)} in slot b", human), human
    code, body = ubox.http("/healthz")
    health = json.loads(body)
    assert code == 200 and health["status"] == "degraded", body
    assert not health["checks"]["update"]["ok"] and broken in health["checks"]["update"]["detail"], health
    metrics = ubox.metrics()
    failed = [(labels, v) for labels, v in metrics["edge_update_failed"] if v == 1]
    assert failed and failed[0][0]["slot"] == "a" and failed[0][0]["version"] == broken, metrics["edge_update_failed"]
    (labels, _), = metrics["edge_appliance_slot_info"]
    assert labels["running_slot"] == "b" and labels["running_version"] == good
    # Data and config intact, and the node works: one more study goes in.
    assert ubox.study_uid in {s["study_instance_uid"] for s in ubox.studies()}
    assert 'id = "clinic-0042"' in ubox.guest_ok(f"cat {CONFIG}")
    print(shlex.join(["boots:", *lines]))
