"""The image recipe and first-boot provisioning, without a full debootstrap (see image/README.md).

What runs here: the scripts parse, every Debian package the recipe names exists in the
archive (apt's local lists), the recipe's dry run installs what it should, the appliance
config is valid for the node, and first boot is run for real on folders (provisioning,
key handling, clean-up), with only its privileged steps (cryptsetup, mkfs, mount) printed.
"""

from __future__ import annotations

import base64
import os
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
    for script in ("build.sh", "firstboot.sh", "flash.sh", "appliance-config.sh"):
        result = subprocess.run(["bash", "-n", str(IMAGE / script)], capture_output=True, check=False, text=True)
        assert result.returncode == 0, (script, result.stderr)


def test_recipe_names_real_debian_packages_with_cups_and_without_dcmtk() -> None:
    packages = _packages()
    assert "cups" in packages and "cryptsetup" in packages and "systemd-timesyncd" in packages
    assert not any(p.startswith("dcmtk") for p in packages)
    shown = subprocess.run(["apt-cache", "show", "--no-all-versions", *packages], capture_output=True, check=False, text=True).stdout
    found = {line.split(":", 1)[1].strip() for line in shown.splitlines() if line.startswith("Package:")}
    missing = [p for p in packages if p not in found]
    if not found:
        pytest.skip("apt lists are empty here (run apt-get update)")
    assert missing == []


def test_dry_run_installs_node_units_and_read_only_layout(tmp_path: Path) -> None:
    result = subprocess.run([str(IMAGE / "build.sh"), "--dry-run", "--out", str(tmp_path)],
                            capture_output=True, check=False, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "debootstrap --variant=minbase" in out and "snapshot.debian.org" in out  # pinned package set
    assert "-r /opt/clinic-edge/requirements.lock" in out
    for unit in ("edge.target", "edge-dicom.service", "edge-ops.service", "edge-firstboot.service"):
        assert unit in out
    assert "ln -sfn /var/lib/clinic-edge/etc" in out and "etc/fstab" in out
    assert "tar --sort=name --numeric-owner --mtime=@" in out  # reproducible archive
    fstab = (IMAGE / "fstab").read_text()
    mounts = {f[1]: f[3].split(",") for f in (line.split() for line in fstab.splitlines() if line and not line.startswith("#"))}
    assert "ro" in mounts["/"]  # root read-only
    assert "nofail" in mounts["/var/lib/clinic-edge"]
    assert "/dev/mapper/edge-data" in fstab
    assert "luks" in (IMAGE / "crypttab").read_text()
    locked = (IMAGE / "requirements.lock").read_text()
    for dep in ("pynetdicom==", "zeroconf==", "prometheus-client==", "tomlkit=="):
        assert dep in locked


def test_appliance_config_is_valid_and_puts_data_on_the_encrypted_partition(tmp_path: Path) -> None:
    text = subprocess.run([str(IMAGE / "appliance-config.sh")], capture_output=True, text=True, check=True).stdout
    (tmp_path / "edge.toml").write_text(text)
    config = load_config(tmp_path / "edge.toml")
    assert str(config.data_dir) == "/var/lib/clinic-edge/data"
    assert config.ops.textfile_dir == "/var/lib/prometheus/node-exporter"


def _firstboot(tmp_path: Path, tpm: bool) -> tuple[subprocess.CompletedProcess[str], dict[str, Path]]:
    paths = {name: tmp_path / name for name in ("boot", "data", "keys", "bin")}
    for path in paths.values():
        path.mkdir()
    edge = paths["bin"] / "edge"
    edge.write_text(f"#!/bin/sh\nexec {sys.executable} -m edge \"$@\"\n")
    edge.chmod(0o755)
    default_config = tmp_path / "default.toml"
    default_config.write_text(subprocess.run([str(IMAGE / "appliance-config.sh")], capture_output=True, text=True, check=True).stdout)
    tpm_path = tmp_path / "tpm0"
    if tpm:
        tpm_path.mkdir()
    key = os.urandom(32)
    (paths["boot"] / "edge-provision.toml").write_text(
        '[node]\nid = "clinic-0042"\nname = "Gugulethu Day Clinic"\n'
        '[dicom]\nae_title = "GUGU_EDGE"\nmodality_host = "10.0.0.20"\n'
        '[cloud]\ndicomweb_url = "https://pacs.example.org/dicom-web"\n'
        '[secrets]\ntoken = "t0ken"\n'
        f'[disk]\nluks_key = "{base64.b64encode(key).decode()}"\n'
    )
    env = {**os.environ, "EDGE_DRY_RUN": "1", "EDGE_BOOT": str(paths["boot"]), "EDGE_BIN": str(edge),
           "EDGE_DATA_DEV": "/dev/null-edge-data", "EDGE_DATA_MNT": str(paths["data"]), "EDGE_KEY_DIR": str(paths["keys"]),
           "EDGE_DEFAULT_CONFIG": str(default_config), "EDGE_TPM": str(tpm_path), "PYTHONPATH": str(REPO)}
    result = subprocess.run(["bash", str(IMAGE / "firstboot.sh")], capture_output=True, check=False, text=True, env=env, timeout=120, cwd=REPO)
    paths["key"] = paths["keys"] / "edge-data.key"
    paths["_key_value"] = Path(base64.b64encode(key).decode())
    return result, paths


def test_first_boot_encrypts_data_applies_provisioning_and_deletes_the_file(tmp_path: Path) -> None:
    result, paths = _firstboot(tmp_path, tpm=False)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    key_file = str(paths["key"])
    assert f"+ cryptsetup luksFormat --type luks2 --batch-mode --key-file {key_file} /dev/null-edge-data" in out
    assert out.index("luksFormat") < out.index("mkfs.ext4") < out.index("+ mount")
    # No TPM2: the key stays on the boot partition for unattended unlock (README says what that protects).
    kept = paths["boot"] / "edge" / "data.key"
    assert kept.read_text().strip() == str(paths["_key_value"]) and (kept.stat().st_mode & 0o777) == 0o600
    # Provisioned onto the data partition; credentials in a 600 file, not in edge.toml.
    config = load_config(paths["data"] / "etc" / "edge.toml")
    assert (config.node.id, config.node.name, config.dicom.ae_title) == ("clinic-0042", "Gugulethu Day Clinic", "GUGU_EDGE")
    assert config.cloud.dicomweb_url == "https://pacs.example.org/dicom-web"
    secrets = config.path(config.cloud.secrets_file)
    assert secrets is not None and secrets.read_text().strip() == 'token = "t0ken"'
    assert (secrets.stat().st_mode & 0o777) == 0o600
    assert "t0ken" not in (paths["data"] / "etc" / "edge.toml").read_text()
    # The provisioning file is gone; a second boot does nothing.
    assert not (paths["boot"] / "edge-provision.toml").exists()
    again = subprocess.run(["bash", str(IMAGE / "firstboot.sh")], capture_output=True, check=False, text=True,
                           env={**os.environ, "EDGE_BOOT": str(paths["boot"]), "EDGE_DRY_RUN": "1"})
    assert again.returncode == 0 and "already provisioned" in again.stdout


def test_first_boot_with_a_tpm_enrolls_it_and_keeps_no_key_file(tmp_path: Path) -> None:
    result, paths = _firstboot(tmp_path, tpm=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "+ systemd-cryptenroll" in result.stdout and "--tpm2-device=auto" in result.stdout
    assert not (paths["boot"] / "edge" / "data.key").exists()
    assert not paths["key"].exists()
