"""The box under test: one card, the QEMU that boots it, the sticks with update bundles.

One box lives through every appliance test, in order (tests/appliance/test_box.py, then
test_update.py), as a box in a clinic does: provisioned once, cut off the mains, updated,
rolled back. conftest.py makes it once per run; a test file run alone provisions it itself.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import hashlib
import json
import os
import random
import re
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid

from tests.appliance.vm import (
    FIGURES,
    GUEST_HOST_ADDRESS,
    ApplianceVM,
    GuestAgentError,
)
from tests.conftest import DCMTK
from tests.dicom_factory import make_dx
from tests.node import free_port
from tests.edge.test_dicom_ingest import dataset_bytes
from tests.edge.test_power_cut import store_and_cut
from tests.peers.fault_proxy import FaultProxy
from tests.peers.orthanc import OrthancPeer

REPO = Path(__file__).resolve().parents[2]


class BuiltImage:
    """image/build.sh's output: the .img and the .update bundle beside it."""

    def __init__(self, img: Path) -> None:
        self.img = img
        self.update = img.with_suffix(".update")
        self.version = img.stem.removeprefix("clinic-edge-")


EDGE = str(REPO / ".venv/bin/edge")
GUEST_EDGE = "/opt/clinic-edge/venv/bin/edge"
NODE_UNITS = ("edge-dicom", "edge-sync", "edge-console", "edge-ops")
DR_AE = "DR1"
BOOT_TIMEOUT = 900.0
"""Power on to the node answering, under TCG on a loaded 2-core box (measured 82–351 s for first boot)."""


SLOT_BYTES = 768 * 1024 * 1024
"""build.sh's SLOT_MB: the manifest's slot_bytes."""
GUEST_PY = "/opt/clinic-edge/venv/bin/python"
CONFIG = "/etc/clinic-edge/edge.toml"
DISKS = ("real", "corrupt", "truncated", "next", "broken")
"""Attached in this order: /dev/disk/by-id/virtio-extra<i>."""
LOG = "/var/lib/clinic-edge/edge-test-update.log"
"""On the data partition: ``edge update`` says it reboots and reboots at once, and a test that
looked a moment late found an empty /run in the next boot (seen in CI: 600 s waiting)."""
FIRST_BOOT_TIMEOUT = 1200.0
"""First boot formats the data partition (argon2id); measured 330 s to luksFormat under TCG on a 2-core box at load 15."""
REBOOT_TIMEOUT = 900.0


def power_cut_rng() -> random.Random:
    seed = int(os.environ.get("EDGE_POWER_CUT_SEED", str(int(time.time()))))
    print(f"power cuts: EDGE_POWER_CUT_SEED={seed}")
    return random.Random(seed)


@dataclass
class Box:
    """The card, the VM booting it, and what the clinic sent to it."""

    workdir: Path
    disk: Path
    image: BuiltImage
    orthanc: OrthancPeer
    proxy: FaultProxy
    dr_port: int
    vm: ApplianceVM
    rng: random.Random
    sent: dict[str, bytes] = field(default_factory=dict)
    """SOP Instance UID -> SHA-256 of the dataset bytes of every instance storescu saw acknowledged."""
    figures: dict[str, str] = field(default_factory=dict)
    config_digest: str = ""
    bundles: dict[str, Path] = field(default_factory=dict)
    """The sticks (DISKS): real, corrupt and truncated from the start; next and broken once made."""
    variants: concurrent.futures.Future[dict[str, Path]] | None = None
    provisioned: bool = False
    """A good provisioning file has been written to the card (first boot may still be under way)."""
    study_uid: str = ""
    later_boots: list[float] = field(default_factory=list)
    """A study stored before any update: it must outlive every one."""

    @property
    def version(self) -> str:
        return self.image.version

    def power_on(self, *, every_stick: bool = False) -> None:
        """With the sticks made so far (``every_stick``: waits for the next and broken bundles)."""
        if self.variants is not None and (every_stick or self.variants.done()):
            self.bundles.update(self.variants.result())
        self.vm.extra_disks = [self.bundles[name] for name in DISKS if name in self.bundles]
        self.vm.start()

    def provision(self, folder: Path) -> subprocess.CompletedProcess[str]:
        """``edge provision --image-file`` with this clinic's good file, as the field engineer does."""
        good = folder / "node.toml"
        good.write_text(provisioning(self.dr_port, self.proxy.port))
        shown = subprocess.run([EDGE, "provision", "--image-file", str(self.disk), "--from-file", str(good)],
                               capture_output=True, text=True, check=False)
        assert shown.returncode == 0, shown.stderr
        self.provisioned = True
        return shown

    def ensure_up(self, folder: Path) -> None:
        """Provisioned and answering C-ECHO: as the earlier tests left it, else set up now (a file run alone)."""
        if not self.provisioned:
            self.provision(folder)
        if not self.vm.running():
            self.power_on()
            seconds = self.wait_echo(FIRST_BOOT_TIMEOUT)
            self.figures.setdefault("power on -> C-ECHO answered", f"{seconds:.0f} s ({self.vm.accel})")
        self.wait_echo(REBOOT_TIMEOUT)

    def power_cut(self) -> None:
        self.vm.kill()

    def guest(self, script: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
        return self.vm.agent.sh(script, timeout=timeout)

    def guest_ok(self, script: str, timeout: float = 180.0) -> str:
        run = self.guest(script, timeout)
        assert run.returncode == 0, f"in the box: {script}\n{run.stdout}\n{run.stderr}"
        return run.stdout

    def echo(self, ae_title: str = "EDGE", calling: str = DR_AE) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(DCMTK / "echoscu"), "-to", "20", "-ta", "20", "-td", "20", "-aet", calling, "-aec", ae_title,
             "127.0.0.1", str(self.vm.port(11112))],
            capture_output=True, text=True, timeout=90,
        )

    def wait_echo(self, timeout: float = BOOT_TIMEOUT) -> float:
        """Until the node answers C-ECHO; seconds since power on."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.vm.running():
                raise AssertionError(f"the box stopped before it answered C-ECHO:\n{self.vm.serial_since_boot()[-3000:]}")
            if self.echo().returncode == 0:
                return time.monotonic() - self.vm.started_at
            time.sleep(2)
        raise AssertionError(f"no C-ECHO answer within {timeout:.0f} s:\n{self.vm.serial_since_boot()[-4000:]}")

    def later_boot_echo(self) -> float:
        """wait_echo on a boot that is not the first: its time joins the figure of later boots."""
        seconds = self.wait_echo()
        self.later_boots.append(seconds)
        self.figures["power on -> C-ECHO answered, later boots (after power cuts)"] = (
            f"{min(self.later_boots):.0f}–{max(self.later_boots):.0f} s over {len(self.later_boots)} boots ({self.vm.accel})")
        return seconds

    def http(self, path: str, port: int = 8080) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.vm.port(port)}{path}"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(url, timeout=30) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def studies(self) -> list[dict[str, Any]]:
        out = self.guest_ok(f"{GUEST_EDGE} --config /etc/clinic-edge/edge.toml studies --json", 240)
        return list(json.loads(out))

    def spool_digests(self) -> dict[str, str]:
        """SOP Instance UID -> SHA-256 of the dataset bytes of every instance in the box's spool."""
        script = (
            "import hashlib, pathlib\n"
            "for p in sorted(pathlib.Path('/var/lib/clinic-edge/data/spool').rglob('*.dcm')):\n"
            "    raw = p.read_bytes(); n = int.from_bytes(raw[140:144], 'little')\n"
            "    print(p.stem, hashlib.sha256(raw[144 + n:]).hexdigest())\n"
        )
        out = self.guest_ok(f"/opt/clinic-edge/venv/bin/python3 - <<'EOF'\n{script}EOF")
        return dict(line.split() for line in out.splitlines() if line.strip())

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
        self.guest_ok(f"rm -f {LOG} {LOG}.err; systemctl reset-failed edge-test-update 2>/dev/null; "
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


def provisioning(box_dr_port: int, proxy_port: int, *, bad: bool = False) -> str:
    """What central ops hands the field engineer for this clinic (an edge.toml fragment)."""
    key = base64.b64encode(os.urandom(32)).decode()
    port_line = 'port = "eleven-one-one-two"' if bad else "port = 11112"
    return f"""\
[node]
id = "clinic-0042"
name = "Gugulethu Day Clinic"

[dicom]
ae_title = "EDGE"
{port_line}
modality_ae = "{DR_AE}"
modality_host = "{GUEST_HOST_ADDRESS}"
modality_port = {box_dr_port}
allowed_calling_aets = ["{DR_AE}"]

[cloud]
dicomweb_url = "http://{GUEST_HOST_ADDRESS}:{proxy_port}/dicom-web"
read_timeout_s = 20.0

[sync]
compress = "none"
retry_min_s = 1.0
retry_max_s = 5.0
poll_interval_s = 2.0

[reports]
poll_interval_s = 3.0
min_backoff_s = 2.0

[kiosk]
viewer_url_template = "https://film.gugulethu-region.test/film/{{token}}"

[disk]
luks_key = "{key}"
"""



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

    zstd at level 3, not build.sh's 8: a test bundle is made beside a running VM, and level 3
    squashes the root in ~4 s on two cores; 7% larger than build.sh's, less than lz4's 60%
    (the box reads and hashes a bundle twice under TCG: its size is the update's time).
    """
    (slot / "root.squashfs").unlink(missing_ok=True)
    subprocess.run(["mksquashfs", str(root), str(slot / "root.squashfs"), "-comp", "zstd", "-Xcompression-level", "3", "-noappend", "-quiet",
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


def series(folder: Path, count: int, study_uid: str, seed: int) -> dict[Path, str]:
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    files = {}
    for i in range(count):
        path = folder / f"img{i:02d}.dcm"
        ds = make_dx(path, rows=512, cols=512, study_uid=study_uid, series_uid=series_uid, accession=f"PC{seed}", seed=seed * 100 + i)
        files[path] = str(ds.SOPInstanceUID)
    return files


def store(box: Box, files: dict[Path, str], *, cut_after: int | None = None) -> list[Path]:
    """storescu from the DR's side; with ``cut_after``, the power goes after that many acks (+ a random bit)."""
    def cut() -> None:
        time.sleep(box.rng.uniform(0.0, 0.5))
        box.power_cut()

    argv = [str(DCMTK / "storescu"), "-v", "-to", "30", "-ta", "30", "-td", "60", "-aet", DR_AE, "-aec", "EDGE", "127.0.0.1",
            str(box.vm.port(11112)), *map(str, sorted(files))]
    acked = store_and_cut(argv, cut_after, cut, wait_s=120)
    for path in acked:
        box.sent[files[path]] = hashlib.sha256(dataset_bytes(path)).hexdigest().encode()
    return acked




@contextlib.contextmanager
def open_box(image: BuiltImage, orthanc: OrthancPeer, proxy: FaultProxy, workdir: Path) -> Iterator[Box]:
    """A blank 8 GB card from the image, its DR (a DCMTK echo/store SCP), its sticks; closed at the end."""
    disk = workdir / "card.img"
    subprocess.run(["cp", "--sparse=always", str(image.img), str(disk)], check=True)
    subprocess.run(["truncate", "-s", "+6G", str(disk)], check=True)
    dr_port = free_port()
    dr = subprocess.Popen([str(DCMTK / "storescp"), "-aet", DR_AE, str(dr_port)], cwd=workdir,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    vm = ApplianceVM(disk, workdir / "vm", host_services=(proxy.port, dr_port))
    b = Box(workdir, disk, image, orthanc, proxy, dr_port, vm, power_cut_rng())
    b.bundles = {
        "real": image.update,
        "corrupt": corrupt_bundle(image.update, workdir / "corrupt.update"),
        "truncated": truncated_bundle(image.update, workdir / "truncated.update"),
    }
    pool = concurrent.futures.ThreadPoolExecutor(1)
    b.variants = pool.submit(variant_bundles, image.update, image.version, workdir / "variants")
    try:
        yield b
    finally:
        FIGURES.update(b.figures)
        vm.close()
        dr.kill()
        pool.shutdown(wait=True)
