"""The image recipe and first-boot provisioning, without a full debootstrap (see image/README.md).

What runs here: the scripts parse, every Debian package the recipe names exists in the
archive (apt's local lists), the recipe's dry run builds what it should from the host's apt
sources, the appliance config is valid for the node, and both first-boot stages (disk,
config) run for real on folders (the check, key handling, provisioning, clean-up, the
reason on the card), with only their privileged steps (sfdisk, cryptsetup, chown) printed.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge.node.config import load_config
from tests.conftest import REPO

IMAGE = REPO / "image"


def _packages() -> list[str]:
    lines = (IMAGE / "packages.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_scripts_parse() -> None:
    for script in ("build.sh", "compare.sh", "firstboot.sh", "flash.sh", "appliance-config.sh"):
        result = subprocess.run(["bash", "-n", str(IMAGE / script)], capture_output=True, check=False, text=True)
        assert result.returncode == 0, (script, result.stderr)


def test_recipe_names_real_debian_packages_without_cups_ssh_or_dcmtk() -> None:
    packages = _packages()
    for needed in ("systemd", "systemd-boot-efi", "linux-image-amd64", "cryptsetup-bin", "systemd-timesyncd",
                   "python3-venv", "dosfstools", "fdisk"):  # fdisk: first boot appends the data partition with sfdisk
        assert needed in packages, needed
    assert "cups" not in packages and not any(p.startswith("openssh") for p in packages)  # no print server, no ssh
    assert not any(p.startswith("dcmtk") for p in packages)
    shown = subprocess.run(["apt-cache", "show", "--no-all-versions", *packages], capture_output=True, check=False, text=True).stdout
    found = {line.split(":", 1)[1].strip() for line in shown.splitlines() if line.startswith("Package:")}
    missing = [p for p in packages if p not in found]
    if not found:
        pytest.skip("apt lists are empty here (run apt-get update)")
    assert missing == []


def _dry_run(tmp_path: Path, *args: str) -> str:
    result = subprocess.run([str(IMAGE / "build.sh"), "--dry-run", "--out", str(tmp_path), *args],
                            capture_output=True, check=False, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_dry_run_builds_from_the_hosts_apt_sources_into_a_squashfs_slot_and_an_mtools_esp(tmp_path: Path) -> None:
    out = _dry_run(tmp_path)
    steps = [line[2:] for line in out.splitlines() if line.startswith("+ ")]
    assert steps and len(steps) == len(out.splitlines())  # a dry run prints its steps and nothing else
    mmdebstrap = next(s for s in steps if s.startswith("mmdebstrap "))
    assert "--variant=minbase" in mmdebstrap and f"--include={','.join(_packages())}" in mmdebstrap
    assert "snapshot.debian.org" not in out  # the machine's own apt sources, not a pinned mirror a laptop cannot reach
    assert any(src in mmdebstrap for src in ("/etc/apt/sources.list", "/etc/apt/sources.list.d/"))
    assert "-r image/requirements.lock" in out  # the locked Python dependencies
    assert any(s.startswith("mksquashfs ") and "-comp zstd" in s for s in steps)  # the read-only root
    assert any(s.startswith("tar --sort=name") and "--numeric-owner --mtime=@" in s and s.endswith("root.squashfs")
               for s in steps)  # the update bundle, reproducibly packed
    assert any(s.startswith("mkfs.vfat -C -F 32") and "--invariant" in s for s in steps)  # the ESP as a file
    assert any(s.startswith("dd ") and ".img " in s and "conv=notrunc" in s and "seek=1 " in s for s in steps)
    assert any("zstd" in s and ".img.zst" in s for s in steps)
    for never in ("mount ", "losetup", "debootstrap ", "kpartx"):  # no loop devices, no mounts: runs in a container
        assert not any(s.startswith(never) or f" {never}" in s for s in steps), never
    pinned = _dry_run(tmp_path, "--snapshot", "20251101T000000Z")
    assert "http://snapshot.debian.org/archive/debian/20251101T000000Z/ bookworm main" in pinned  # still an option


def test_recipe_installs_the_node_units_and_the_read_only_layout() -> None:
    recipe = (IMAGE / "build.sh").read_text()
    for unit in ("edge.target", "edge-*.service", "edge-firstboot.service", "edge-provision.service",
                 "edge-datakey.service", "image/firstboot.sh"):
        assert unit in recipe, unit
    assert "ln -sfn /var/lib/clinic-edge/etc" in recipe and "image/fstab" in recipe and "image/crypttab" in recipe
    assert "name=esp" in recipe and "name=root-a" in recipe and "name=root-b" in recipe
    assert "mcopy" in recipe and "::/loader/entries/" in recipe  # the ESP filled with mtools, slot A's boot entry
    fstab = (IMAGE / "fstab").read_text()
    mounts = {f[1]: (f[2], f[3].split(",")) for f in (line.split() for line in fstab.splitlines()
                                                       if line.strip() and not line.startswith("#"))}
    assert "/" not in mounts  # the slot's squashfs, read-only by nature, named on the kernel command line
    assert mounts["/boot/efi"][0] == "vfat" and "nofail" in mounts["/boot/efi"][1]  # a blank card still boots
    # The data partition is not in fstab: firstboot.sh's open stage unlocks and mounts it (a
    # card never provisioned has none, and on first boot it appears only after the disk stage).
    assert "/var/lib/clinic-edge" not in mounts
    assert "firstboot.sh open" in (IMAGE / "edge-data.service").read_text()
    locked = (IMAGE / "requirements.lock").read_text()
    for dep in ("pynetdicom==", "zeroconf==", "prometheus-client==", "tomlkit=="):
        assert dep in locked


def test_appliance_config_is_valid_and_puts_data_on_the_encrypted_partition(tmp_path: Path) -> None:
    text = subprocess.run([str(IMAGE / "appliance-config.sh")], capture_output=True, text=True, check=True).stdout
    (tmp_path / "edge.toml").write_text(text)
    config = load_config(tmp_path / "edge.toml")
    assert str(config.data_dir) == "/var/lib/clinic-edge/data"
    assert config.ops.textfile_dir == "/var/lib/prometheus/node-exporter"


# First boot, run for real on folders: EDGE_DRY_RUN=1 prints its privileged steps (sfdisk,
# cryptsetup, systemd-cryptenroll, chown) instead of running them; EDGE_* point its paths here.

GOOD_FILE = (
    '[node]\nid = "clinic-0042"\nname = "Gugulethu Day Clinic"\n'
    '[dicom]\nae_title = "GUGU_EDGE"\nmodality_host = "10.0.0.20"\n'
    '[cloud]\ndicomweb_url = "https://pacs.example.org/dicom-web"\n'
    '[secrets]\ntoken = "t0ken"\n'
)


class FirstBoot:
    """One node's first boot in tmp_path: the ESP, the data partition's mount point, /run's key folder."""

    def __init__(self, tmp_path: Path, tpm: bool) -> None:
        self.boot, self.data, self.keys, bin_dir = (tmp_path / n for n in ("boot", "data", "keys", "bin"))
        for path in (self.boot, self.data, self.keys, bin_dir):
            path.mkdir()
        edge = bin_dir / "edge"
        edge.write_text(f"#!/bin/sh\nexec {sys.executable} -m edge \"$@\"\n")
        edge.chmod(0o755)
        default_config = tmp_path / "default.toml"  # the root's /usr/lib/clinic-edge/edge.toml, data under tmp_path
        text = subprocess.run([str(IMAGE / "appliance-config.sh")], capture_output=True, text=True, check=True).stdout
        default_config.write_text(text.replace('"/var/lib/clinic-edge/data"', f'"{self.data / "data"}"'))
        tpm_path = tmp_path / "tpm0"
        if tpm:
            tpm_path.mkdir()
        self.key = os.urandom(32)
        self.key_file = self.keys / "edge-data.key"
        self.provision = self.boot / "edge-provision.toml"
        self.errors = self.boot / "firstboot-error.txt"
        self.env = {**os.environ, "EDGE_DRY_RUN": "1", "EDGE_BOOT": str(self.boot), "EDGE_BIN": str(edge),
                    "EDGE_DATA_DEV": str(tmp_path / "no-edge-data"), "EDGE_DATA_MNT": str(self.data),
                    "EDGE_KEY_DIR": str(self.keys), "EDGE_DEFAULT_CONFIG": str(default_config),
                    "EDGE_TPM": str(tpm_path), "EDGE_DISK": "/dev/vda", "PYTHONPATH": str(REPO)}

    def write_file(self, text: str = GOOD_FILE, disk_key: bool = True) -> None:
        key = f'[disk]\nluks_key = "{base64.b64encode(self.key).decode()}"\n' if disk_key else ""
        self.provision.write_text(text + key)

    def run(self, stage: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(IMAGE / "firstboot.sh"), stage], capture_output=True, check=False,
                              text=True, env=self.env, timeout=120, cwd=REPO)


def test_first_boot_disk_stage_checks_the_file_then_makes_and_encrypts_the_data_partition(tmp_path: Path) -> None:
    node = FirstBoot(tmp_path, tpm=False)
    node.write_file()
    node.errors.write_text("an old failure\n")
    result = node.run("disk")
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]
    # The data partition goes into the card's free space after the slots, once.
    assert "sfdisk --relocate gpt-bak-std /dev/vda" in steps
    assert "sfdisk --append --no-reread /dev/vda" in steps
    # LUKS2 with a KDF that fits a 1 GB box, keyed by the file's key, which sits on /run only.
    luks = next(s for s in steps if s.startswith("cryptsetup luksFormat"))
    assert "--type luks2" in luks and "--pbkdf argon2id --pbkdf-memory 65536" in luks
    assert f"--key-file {node.key_file}" in luks and "--label edge-data" in luks
    assert base64.b64decode(node.key_file.read_text()) == node.key and (node.key_file.stat().st_mode & 0o777) == 0o600
    # No TPM2: the key stays on the ESP for unattended unlock (image/README.md says what that protects).
    kept = node.boot / "edge" / "data.key"
    assert base64.b64decode(kept.read_text()) == node.key and (kept.stat().st_mode & 0o777) == 0o600
    assert "systemd-cryptenroll" not in result.stdout
    # The file stays for the config stage; the old failure's reason is gone.
    assert node.provision.exists() and not node.errors.exists()


def test_first_boot_config_stage_applies_config_and_secrets_and_deletes_the_file(tmp_path: Path) -> None:
    node = FirstBoot(tmp_path, tpm=False)
    node.write_file()
    assert node.run("disk").returncode == 0
    result = node.run("config")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "firstboot: provisioned" in result.stdout and f"+ chown -R edge:edge {node.data / 'etc'}" in result.stdout
    config = load_config(node.data / "etc" / "edge.toml")
    assert (config.node.id, config.node.name, config.dicom.ae_title) == ("clinic-0042", "Gugulethu Day Clinic", "GUGU_EDGE")
    assert config.cloud.dicomweb_url == "https://pacs.example.org/dicom-web"
    secrets = config.path(config.cloud.secrets_file)
    assert secrets is not None and secrets.read_text().strip() == 'token = "t0ken"'
    assert (secrets.stat().st_mode & 0o777) == 0o600
    assert "t0ken" not in (node.data / "etc" / "edge.toml").read_text()
    assert not node.provision.exists()  # credentials on a FAT partition: gone
    # Later boots provision nothing: both stages see no file.
    for stage in ("disk", "config"):
        again = node.run(stage)
        assert again.returncode == 0 and "nothing to provision" in again.stdout and "+ " not in again.stdout


def test_first_boot_with_a_tpm_enrolls_it_and_keeps_no_key_file(tmp_path: Path) -> None:
    node = FirstBoot(tmp_path, tpm=True)
    node.write_file()
    result = node.run("disk")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "+ systemd-cryptenroll" in result.stdout and "--tpm2-device=auto --tpm2-pcrs=7" in result.stdout
    assert not (node.boot / "edge" / "data.key").exists()
    assert node.run("config").returncode == 0
    assert not node.key_file.exists()  # the TPM2 unlocks it now; the key left with the field engineer


def test_a_bad_key_stops_first_boot_named_on_the_console_and_the_card_and_a_fixed_file_boots(tmp_path: Path) -> None:
    node = FirstBoot(tmp_path, tpm=False)
    node.write_file(GOOD_FILE + '[kiosk]\nlanguags = ["zu"]\n')
    result = node.run("disk")
    assert result.returncode == 1
    assert "firstboot: FAILED:" in result.stderr and "[kiosk] languags: unknown key" in result.stderr
    assert "+ " not in result.stdout and not node.key_file.exists()  # stopped before anything was changed
    reason = node.errors.read_text()
    assert f"{node.provision}: [kiosk] languags: unknown key" in reason and "edge provision --image-file" in reason
    assert node.provision.exists()  # kept, so the engineer can see it (edge provision --image-file IMG --show)

    # The engineer fixes the file and the box is restarted.
    node.write_file(GOOD_FILE + '[kiosk]\nlanguages = ["en", "zu"]\n')
    assert node.run("disk").returncode == 0 and not node.errors.exists()
    assert node.run("config").returncode == 0
    assert load_config(node.data / "etc" / "edge.toml").kiosk.languages == ["en", "zu"]


def test_every_boot_opens_the_data_partition_and_a_card_without_one_is_left_unprovisioned(tmp_path: Path) -> None:
    node = FirstBoot(tmp_path, tpm=False)
    blank = node.run("open")  # no provisioning file and no data partition: a card never set up
    assert blank.returncode == 0 and "not provisioned" in blank.stdout and "+ " not in blank.stdout
    (tmp_path / "no-edge-data").touch()  # the partition the disk stage made
    result = node.run("open")
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]
    attach = next(s for s in steps if "systemd-cryptsetup attach edge-data" in s)
    assert f"{tmp_path / 'no-edge-data'}" in attach and "tpm2-device=auto" in attach
    assert any(s.startswith("mount ") and s.endswith(str(node.data)) for s in steps)


def test_a_file_without_the_data_key_is_named_on_the_card(tmp_path: Path) -> None:
    node = FirstBoot(tmp_path, tpm=False)
    node.write_file(disk_key=False)
    result = node.run("disk")
    assert result.returncode == 1
    assert "no [disk] luks_key" in node.errors.read_text()
    assert "cryptsetup" not in result.stdout


def _fake_image(tmp_path: Path, name: str, root_text: str, esp_text: str) -> Path:
    """A sparse disk with build.sh's offsets: a FAT ESP at 1 MiB, a squashfs root A at 257 MiB."""
    if not all(shutil.which(t) for t in ("mksquashfs", "mkfs.vfat", "mcopy")):
        pytest.skip("needs squashfs-tools, dosfstools and mtools")
    work = tmp_path / name
    (work / "root/etc").mkdir(parents=True)
    (work / "root/etc/version").write_text(root_text)
    (work / "entry.conf").write_text(esp_text)
    for made in (work / "root/etc/version", work / "root/etc", work / "root", work / "entry.conf"):
        os.utime(made, (1700000000, 1700000000))  # as build.sh does: SOURCE_DATE_EPOCH, not the clock
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1700000000", "MTOOLS_SKIP_CHECK": "1"}
    for argv in (
        ["mksquashfs", str(work / "root"), str(work / "root.sq"), "-noappend", "-quiet", "-no-progress", "-no-xattrs"],
        ["mkfs.vfat", "-C", "-F", "32", "-i", "0ed6e000", "--invariant", str(work / "esp.img"), str(256 * 1024)],
        ["mcopy", "-m", "-i", str(work / "esp.img"), str(work / "entry.conf"), "::/entry.conf"],
    ):
        subprocess.run(argv, check=True, capture_output=True, env=env)
    img = work / "clinic-edge.img"
    subprocess.run(["truncate", "-s", f"{1 + 256 + 768}M", str(img)], check=True)
    for part, seek in (("esp.img", 1), ("root.sq", 257)):
        subprocess.run(["dd", f"if={work / part}", f"of={img}", "bs=1M", f"seek={seek}", "conv=notrunc,sparse", "status=none"], check=True)
    return img


def _compare(a: Path, b: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(IMAGE / "compare.sh"), str(a), str(b)], capture_output=True, text=True, check=False, timeout=120)


def test_compare_says_two_builds_are_the_same_or_names_the_part_and_file_that_differs(tmp_path: Path) -> None:
    one = _fake_image(tmp_path, "one", "0.1.0\n", "title Clinic Edge\n")
    same = _compare(one, _fake_image(tmp_path, "again", "0.1.0\n", "title Clinic Edge\n"))
    assert same.returncode == 0 and same.stdout.startswith("same: the two images are the same bytes"), same.stdout + same.stderr

    root = _compare(one, _fake_image(tmp_path, "root", "0.1.1\n", "title Clinic Edge\n"))
    assert root.returncode == 1, root.stdout + root.stderr
    assert "same: GPT" in root.stdout and "same: ESP" in root.stdout
    assert "DIFFERS: root A" in root.stdout and "/etc/version" in root.stdout

    esp = _compare(one, _fake_image(tmp_path, "esp", "0.1.0\n", "title Clinic Edge, other\n"))
    assert esp.returncode == 1 and "DIFFERS: ESP" in esp.stdout and "entry.conf" in esp.stdout, esp.stdout
    assert "same: root A" in esp.stdout

    missing = _compare(one, tmp_path / "nothing.img")
    assert missing.returncode == 2 and "no such image" in missing.stderr
