"""One box's life, as a field engineer and a clinic live it, under real systemd in QEMU.

The tests run in order on one card (a copy of the built image with room for the data
partition; tests/appliance/box.py), because that is how a box lives (test_update.py then
updates the same box): a bad provisioning file first, then the
fixed one, first boot (with a power cut in the middle of it), the node's units, the
watchdog and the sandbox, ``edge doctor``, memory, and power cuts during C-STORE, during
an upload and while a report is fetched. Every power cut is a SIGKILL of QEMU: the
guest's page cache is gone. After each, every instance storescu saw acknowledged must be
on the box byte-identical and reach the cloud exactly once, counted at the proxy.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from tests.appliance.box import (
    BOOT_TIMEOUT,
    GUEST_EDGE,
    NODE_UNITS,
    Box,
    provisioning,
    series,
    store,
)
from tests.dicom_factory import make_dx
from tests.sync.test_reports import reader_sr

pytestmark = [pytest.mark.appliance, pytest.mark.timeout(1500)]

def _esp_files(disk: Path) -> str:
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    return subprocess.run(["mdir", "-b", "-i", f"{disk}@@1M", "::/"], capture_output=True, text=True, env=env).stdout


def _esp_read(disk: Path, name: str) -> str:
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    return subprocess.run(["mtype", "-i", f"{disk}@@1M", f"::/{name}"], capture_output=True, text=True, env=env).stdout


def _wait_refused(box: Box) -> str:
    deadline = time.monotonic() + 240
    while (refused := box.echo()).returncode == 0 or "Rejected" not in refused.stdout + refused.stderr:
        assert time.monotonic() < deadline, f"C-ECHO was not refused: {refused.stdout}{refused.stderr}"
        time.sleep(2)
    return refused.stdout + refused.stderr


def test_a_card_without_provisioning_boots_safe_and_says_what_is_missing(box: Box) -> None:
    box.power_on()
    box.vm.wait_agent(BOOT_TIMEOUT)
    assert "Rejected Permanent" in _wait_refused(box)
    status, page = box.http("/")
    assert status == 503 and "edge-provision.toml" in page, page[:2000]
    assert "not provisioned" in box.vm.serial_since_boot()
    assert "edge-dicom" not in box.guest_ok("systemctl list-units --state=active --no-legend 'edge-*'")
    assert box.guest("test -e /dev/disk/by-partlabel/edge-data").returncode != 0, "no data partition without provisioning"
    box.vm.agent.power_off()
    assert box.vm.wait_exit(180) == 0


def test_a_bad_provisioning_file_stops_first_boot_naming_the_key(box: Box, tmp_path: Path) -> None:
    # A file edited by hand on the card (edge provision itself refuses a bad one on the laptop).
    bad = tmp_path / "edge-provision.toml"
    bad.write_text(provisioning(box.dr_port, box.proxy.port, bad=True))
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    subprocess.run(["mcopy", "-o", "-i", f"{box.disk}@@1M", str(bad), "::/edge-provision.toml"], check=True, env=env)

    box.power_on()
    box.vm.wait_serial(r"firstboot: FAILED: .*\[dicom\] port", BOOT_TIMEOUT)
    box.vm.wait_agent(BOOT_TIMEOUT)
    # The safe unprovisioned state: DICOM refused with a reason, the console says why.
    _wait_refused(box)
    status, page = box.http("/")
    assert status == 503 and "First boot failed" in page and "[dicom] port" in page
    assert "edge-dicom" not in box.guest_ok("systemctl list-units --state=active --no-legend 'edge-*'")
    box.vm.agent.power_off()
    assert box.vm.wait_exit(120) == 0
    assert "[dicom] port" in _esp_read(box.disk, "firstboot-error.txt")
    assert "edge-provision.toml" in _esp_files(box.disk), "the bad file must stay for the engineer to fix"


def test_the_fixed_file_provisions_once_even_with_a_power_cut_during_first_boot(box: Box, tmp_path: Path) -> None:
    shown = box.provision(tmp_path)  # edge provision --image-file, as the field engineer does
    assert "last first boot failed" in shown.stdout + shown.stderr

    # Power cut #1: somewhere inside first boot (after the disk stage started).
    box.power_on()
    box.vm.wait_serial(r"firstboot\.sh\[\d+\]: \+ ", BOOT_TIMEOUT)
    time.sleep(box.rng.uniform(0.0, 12.0))
    box.power_cut()

    box.power_on()
    seconds = box.wait_echo()
    box.figures["power on -> C-ECHO answered (first boot finishing after a cut)"] = f"{seconds:.0f} s ({box.vm.accel})"
    esp = _esp_files(box.disk)
    assert "edge-provision.toml" not in esp.lower() and "firstboot-error.txt" not in esp.lower(), esp
    listing = box.guest_ok("stat -c '%a %U %n' /etc/clinic-edge/edge.toml $(ls /var/lib/clinic-edge/data/kiosk/*.pem 2>/dev/null)")
    for line in listing.splitlines():
        assert line.startswith("600 edge "), f"config and secrets must be mode 600, the node's: {line}"
    toml = box.guest_ok("cat /etc/clinic-edge/edge.toml")
    assert 'id = "clinic-0042"' in toml and "10.0.2.2" in toml
    dump = box.guest_ok("cryptsetup luksDump /dev/disk/by-partlabel/edge-data")
    assert "Version:       \t2" in dump or re.search(r"Version:\s+2", dump)
    assert re.search(r"PBKDF:\s+argon2id", dump) and re.search(r"Memory:\s+65536", dump), dump
    assert "crypt /var/lib/clinic-edge" in box.guest_ok("lsblk -rno TYPE,MOUNTPOINT")


def test_every_node_unit_reports_ready(box: Box) -> None:
    # The DICOM receiver starts first (C-ECHO as early as possible); the others follow.
    started = time.monotonic()
    for unit in NODE_UNITS:
        while True:
            show = box.guest_ok(f"systemctl show {unit} -p Type -p ActiveState -p SubState -p StatusText")
            if "ActiveState=activating" not in show or time.monotonic() - started > BOOT_TIMEOUT:
                break
            time.sleep(3)
        assert "Type=notify" in show and "ActiveState=active" in show and "SubState=running" in show, f"{unit}: {show}"
    box.figures["every node service READY, after C-ECHO answered"] = f"+{time.monotonic() - started:.0f} s"
    assert "ActiveState=active" in box.guest_ok("systemctl show edge-boot-check -p ActiveState")
    assert "/" in box.guest_ok("findmnt -no TARGET,OPTIONS / | grep -w ro")
    box.config_digest = box.guest_ok("sha256sum /etc/clinic-edge/edge.toml").split()[0]


def _assert_not_provisioned_again(box: Box) -> None:
    """A later boot: the first-boot units did not run, the config is the one first boot wrote."""
    for unit in ("edge-firstboot", "edge-provision"):
        assert "ConditionResult=no" in box.guest_ok(f"systemctl show {unit} -p ConditionResult"), unit
    assert box.guest_ok("sha256sum /etc/clinic-edge/edge.toml").split()[0] == box.config_digest


def test_edge_doctor_in_the_box_passes_all_but_what_a_vm_lacks(box: Box) -> None:
    run = box.guest(f"{GUEST_EDGE} --config /etc/clinic-edge/edge.toml doctor --json", 240)
    print(run.stdout)
    items = {item["name"]: item for item in json.loads(run.stdout)}
    # What a VM in a loopback-only namespace truly lacks: a time server, a TPM2.
    assert "clock" in items  # any verdict: no time server is reachable from the namespace
    assert items["tpm"]["verdict"] == "warn" and "ESP" in items["tpm"]["detail"], items["tpm"]
    others = {name: item for name, item in items.items() if name not in ("clock", "tpm")}
    not_passing = {name: item for name, item in others.items() if item["verdict"] not in ("pass", "skip")}
    assert not_passing == {}, not_passing
    for name in ("config", "encryption", "services", "dr", "cloud", "c-store", "worklist"):
        assert items[name]["verdict"] == "pass", items[name]
    box.figures["edge doctor in the box"] = ", ".join(f"{n} {i['verdict'].upper()}" for n, i in items.items())


def test_memory_of_the_node_on_a_1_gb_box(box: Box) -> None:
    out = box.guest_ok(
        "for u in " + " ".join(NODE_UNITS) + "; do p=$(systemctl show -p MainPID --value $u); "
        "echo $u $(awk '/VmRSS/{print $2}' /proc/$p/status) $(awk '/^Pss:/{print $2}' /proc/$p/smaps_rollup); done; "
        "grep MemAvailable /proc/meminfo"
    )
    rss = {line.split()[0]: int(line.split()[1]) // 1024 for line in out.splitlines() if line.startswith("edge-")}
    pss = {line.split()[0]: int(line.split()[2]) // 1024 for line in out.splitlines() if line.startswith("edge-")}
    box.figures["node services PSS (shared pages counted once)"] = f"{sum(pss.values())} MB"
    available = int(re.search(r"MemAvailable:\s+(\d+)", out).group(1)) // 1024  # type: ignore[union-attr]
    print("\n".join(f"RSS {u}: {mb} MB" for u, mb in rss.items()), f"\nnode total {sum(rss.values())} MB, available {available} MB")
    box.figures["node services RSS (goal <= 300 MB)"] = f"{sum(rss.values())} MB ({', '.join(f'{u} {m}' for u, m in rss.items())})"
    box.figures["MemAvailable with all up (goal >= 400 MB)"] = f"{available} MB"
    assert set(rss) == set(NODE_UNITS) and all(mb > 0 for mb in rss.values())
    assert available > 200, "the box is close to running out of memory"


def test_the_watchdog_restarts_a_stopped_service(box: Box) -> None:
    # A shorter watchdog for this test only (/run is gone at the next boot).
    box.guest_ok(
        "mkdir -p /run/systemd/system/edge-sync.service.d && "
        "printf '[Service]\\nWatchdogSec=8s\\n' > /run/systemd/system/edge-sync.service.d/test-watchdog.conf && "
        "systemctl daemon-reload && systemctl restart edge-sync"
    )
    before = box.guest_ok("systemctl show edge-sync -p MainPID -p NRestarts")
    pid = re.search(r"MainPID=(\d+)", before).group(1)  # type: ignore[union-attr]
    restarts = int(re.search(r"NRestarts=(\d+)", before).group(1))  # type: ignore[union-attr]
    box.guest_ok(f"kill -STOP {pid}")
    deadline = time.monotonic() + 150
    while True:
        now = box.guest_ok("systemctl show edge-sync -p MainPID -p NRestarts -p ActiveState")
        if int(re.search(r"NRestarts=(\d+)", now).group(1)) > restarts and "ActiveState=active" in now:  # type: ignore[union-attr]
            break
        assert time.monotonic() < deadline, f"the stopped edge-sync was not restarted: {now}"
        time.sleep(3)
    assert f"MainPID={pid}\n" not in now
    # grep fails (and guest_ok with it) unless systemd logged the watchdog for edge-sync.
    box.guest_ok("journalctl -b -u edge-sync --no-pager | grep -i watchdog")
    box.guest_ok("rm -r /run/systemd/system/edge-sync.service.d && systemctl daemon-reload")


def test_the_sandbox_keeps_a_service_inside_its_data_directory(box: Box) -> None:
    pid = box.guest_ok("systemctl show -p MainPID --value edge-dicom").strip()
    inside = f"nsenter -t {pid} -m -S $(id -u edge) -G $(id -g edge) --"
    # /run/lock is writable by everyone outside the sandbox...
    box.guest_ok("setpriv --reuid edge --regid edge --clear-groups touch /run/lock/edge-outside && rm /run/lock/edge-outside")
    for target in ("/run/lock/edge-x", "/boot/efi/edge-x", "/var/tmp/../edge-x", "/etc/clinic-edge/../../edge-x"):
        run = box.guest(f"{inside} touch {target}")
        assert run.returncode != 0, f"edge-dicom could write {target}"
    box.guest_ok(f"{inside} touch /var/lib/clinic-edge/data/edge-sandbox-probe && rm /var/lib/clinic-edge/data/edge-sandbox-probe")


def _assert_acknowledged_kept_and_uploaded_once(box: Box, timeout: float = 300.0) -> None:
    kept = box.spool_digests()
    for sop, digest in box.sent.items():
        assert sop in kept, f"acknowledged instance {sop} lost in a power cut"
        assert kept[sop].encode() == digest, f"instance {sop} is not byte-identical to what the DR sent"
    deadline = time.monotonic() + timeout
    while not set(box.sent) <= set(box.orthanc.sop_instance_uids()):
        assert time.monotonic() < deadline, f"not every acknowledged instance reached the cloud: {len(set(box.sent) - set(box.orthanc.sop_instance_uids()))} missing"
        time.sleep(3)
    counts = box.proxy.stored_uploads()
    for sop in box.sent:
        assert counts[sop] == 1, f"{sop} reached the cloud {counts[sop]} times (exactly once expected)"


def test_power_cut_during_c_store_keeps_every_acknowledged_instance(box: Box, tmp_path: Path) -> None:
    files = series(tmp_path / "s1", 24, generate_uid(), 1)
    box.proxy.set_mode("hang")  # the uplink is down: everything stays on the box
    acked = store(box, files, cut_after=box.rng.randint(2, 18))
    assert 0 < len(acked) < len(files), "the power cut did not land mid-series"
    box.proxy.set_mode("pass")
    box.power_on()
    box.later_boot_echo()
    _assert_not_provisioned_again(box)
    _assert_acknowledged_kept_and_uploaded_once(box)


def test_power_cut_during_an_upload_uploads_exactly_once(box: Box, tmp_path: Path) -> None:
    files = series(tmp_path / "s2", 12, generate_uid(), 2)
    box.proxy.set_mode("slow", bps=400_000)  # a slow shared uplink: uploads take a while
    seen = len(box.proxy.requests)  # (never clear the proxy: it counts every upload of the whole box's life)
    acked = store(box, files)
    assert len(acked) == len(files)
    deadline = time.monotonic() + 240
    while not any(r.is_stow and r.finished is None for r in box.proxy.requests[seen:]):
        assert time.monotonic() < deadline, "no upload started"
        time.sleep(0.2)
    time.sleep(box.rng.uniform(0.0, 2.0))
    box.power_cut()
    box.proxy.set_mode("pass")
    box.power_on()
    box.later_boot_echo()
    _assert_acknowledged_kept_and_uploaded_once(box)


def test_power_cut_while_a_report_is_fetched_then_the_report_arrives_once(box: Box, tmp_path: Path) -> None:
    image_path = tmp_path / "cr.dcm"
    study_uid = generate_uid()
    image = make_dx(image_path, rows=256, cols=256, study_uid=study_uid, accession="REP1")
    acked = store(box, {image_path: str(image.SOPInstanceUID)})
    assert acked == [image_path]
    _assert_acknowledged_kept_and_uploaded_once(box)
    box.proxy.set_mode("hang", forward=True)  # the report's fetch reaches the cloud, its answer never comes back
    seen = len(box.proxy.requests)
    sr = reader_sr(tmp_path / "sr.dcm", image, "No active pulmonary disease.")
    assert box.orthanc.upload(tmp_path / "sr.dcm")["Status"] == "Success"
    deadline = time.monotonic() + 180
    while not any(r.method == "GET" and study_uid in r.path and r.finished is None for r in box.proxy.requests[seen:]):
        assert time.monotonic() < deadline, "the box never asked the cloud about its report"
        time.sleep(0.2)
    time.sleep(box.rng.uniform(0.0, 1.0))
    box.power_cut()
    box.proxy.set_mode("pass")
    box.power_on()
    box.later_boot_echo()
    deadline = time.monotonic() + 240
    while True:
        study = next(s for s in box.studies() if s["study_instance_uid"] == study_uid)
        if study["report_state"] in ("ready", "printed"):
            break
        assert time.monotonic() < deadline, f"the report never arrived after the power cut: {study}"
        time.sleep(5)
    count = box.guest_ok(
        "/opt/clinic-edge/venv/bin/python3 -c \"import sqlite3,glob; db=sqlite3.connect(glob.glob('/var/lib/clinic-edge/data/*.db')[0]); "
        f"print(db.execute(\\\"select count(*) from report where sop_instance_uid='{sr.SOPInstanceUID}'\\\").fetchone()[0])\""
    )
    assert count.strip() == "1", f"the report was kept {count.strip()} times"
