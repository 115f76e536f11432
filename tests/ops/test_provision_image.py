"""A field engineer provisions a card image on a laptop: no mount, no loop device, real mtools.

The card is built here the way image/build.sh builds one, only small: a GPT made by
sfdisk (ESP, root-a, root-b), a FAT32 filesystem made by ``mkfs.vfat -C`` and laid in at
the ESP's offset with dd. ``edge provision --image-file`` runs as a subprocess, as the
engineer types it; what it wrote is read back with mtools, as a second tool would.
And first boot's gate, ``edge provision --from-file … --check``: the bad key named, a
good file passed, nothing written anywhere.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO

ESP_START_MIB = 1
ESP_MIB = 40  # FAT32 needs ~33 MiB at least; build.sh makes 256
ROOT_A_MARK = b"squashfs root A: must not be touched\n"
MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
SLOT_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("mcopy", "mtype", "mdir", "sfdisk", "mkfs.vfat")),
    reason="needs mtools, dosfstools and fdisk (scripts/test.sh installs them)",
)


def edge(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``edge`` as the engineer runs it: the console script when installed, else ``python -m edge``."""
    script = Path(sys.executable).with_name("edge")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "edge"]
    return subprocess.run([*argv, *args], input=stdin, capture_output=True, text=True, check=False, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, cwd=cwd)


def make_card(path: Path, *, esp_type: str = ESP_TYPE, name: str = "esp", label: str = "gpt") -> Path:
    """A small card image laid out like build.sh's: ESP (FAT32, with a loader file), root-a (marked), root-b."""
    total_mib = ESP_START_MIB + ESP_MIB + 2 * 4 + 1
    subprocess.run(["truncate", "-s", f"{total_mib}M", str(path)], check=True)
    if label == "gpt":
        table = (f"label: gpt\nstart={ESP_START_MIB}MiB, size={ESP_MIB}MiB, type={esp_type}, name={name}\n"
                 f"size=4MiB, type={SLOT_TYPE}, name=root-a\nsize=4MiB, type={SLOT_TYPE}, name=root-b\n")
    else:
        table = f"label: dos\nstart={ESP_START_MIB}MiB, size={ESP_MIB}MiB, type=ef\n"
    subprocess.run(["sfdisk", "-q", str(path)], input=table, text=True, check=True)
    esp = path.with_suffix(".esp")
    subprocess.run(["mkfs.vfat", "-C", "-F", "32", "-n", "ESP", str(esp), str(ESP_MIB * 1024)],
                   capture_output=True, check=True)
    subprocess.run(["mmd", "-i", str(esp), "::/loader"], env=MTOOLS_ENV, check=True)
    subprocess.run(["mcopy", "-i", str(esp), "-", "::/loader/loader.conf"], input=b"timeout 0\n", env=MTOOLS_ENV, check=True)
    subprocess.run(["dd", f"if={esp}", f"of={path}", "bs=1M", f"seek={ESP_START_MIB}", "conv=notrunc", "status=none"], check=True)
    esp.unlink()
    with path.open("r+b") as f:
        f.seek((ESP_START_MIB + ESP_MIB) * 1024 * 1024)
        f.write(ROOT_A_MARK)
    return path


def esp_drive(card: Path) -> str:
    return f"{card}@@{ESP_START_MIB * 1024 * 1024}"


def esp_names(card: Path) -> list[str]:
    out = subprocess.run(["mdir", "-b", "-i", esp_drive(card), "::/"], env=MTOOLS_ENV, capture_output=True,
                         text=True, check=True).stdout
    return sorted(line.rstrip("/").rsplit("/", 1)[-1] for line in out.splitlines() if line.strip())


def esp_read(card: Path, name: str) -> str:
    return subprocess.run(["mtype", "-i", esp_drive(card), f"::/{name}"], env=MTOOLS_ENV, capture_output=True,
                          text=True, check=True).stdout


def esp_put(card: Path, name: str, text: str) -> None:
    subprocess.run(["mcopy", "-D", "o", "-i", esp_drive(card), "-", f"::/{name}"], input=text.encode(),
                   env=MTOOLS_ENV, check=True)


def root_a_mark(card: Path) -> bytes:
    with card.open("rb") as f:
        f.seek((ESP_START_MIB + ESP_MIB) * 1024 * 1024)
        return f.read(len(ROOT_A_MARK))


PROVISION_ARGS = ("--node-id", "clinic-0042", "--name", "Gugulethu Day Clinic", "--ae-title", "GUGU_EDGE",
                  "--modality-host", "10.0.0.20", "--cloud-url", "https://pacs.example.org/dicom-web", "--token", "-")


def test_a_field_engineer_writes_the_provisioning_file_into_the_cards_esp_without_mounting(tmp_path: Path) -> None:
    card = make_card(tmp_path / "clinic-edge-0.1.0.img")
    mounts_before = set(Path("/proc/self/mounts").read_text().splitlines())
    result = edge("--config", str(tmp_path / "absent.toml"), "provision", "--image-file", str(card), *PROVISION_ARGS,
                  stdin="s3cret-t0ken\n")
    assert result.returncode == 0, result.stderr
    assert "wrote edge-provision.toml to" in result.stdout and "ESP at byte 1048576" in result.stdout
    assert "s3cret-t0ken" not in result.stdout + result.stderr  # the token came on stdin and is not echoed
    added = set(Path("/proc/self/mounts").read_text().splitlines()) - mounts_before  # other tests may mount their own
    assert [m for m in added if "vfat" in m or "/dev/loop" in m or str(tmp_path) in m] == []  # nothing of the card's

    # Read back with mtools, as first boot's Linux will read it from the FAT.
    assert esp_names(card) == ["edge-provision.toml", "loader"]
    written = tomllib.loads(esp_read(card, "edge-provision.toml"))
    assert written["node"] == {"id": "clinic-0042", "name": "Gugulethu Day Clinic"}
    assert written["dicom"] == {"ae_title": "GUGU_EDGE", "modality_host": "10.0.0.20"}
    assert written["cloud"] == {"dicomweb_url": "https://pacs.example.org/dicom-web"}
    assert written["secrets"] == {"token": "s3cret-t0ken"}  # FAT has no file modes: first boot moves it into a 600 file
    # The rest of the card is as it was: the loader's file, and slot A's bytes right after the ESP.
    assert esp_read(card, "loader/loader.conf") == "timeout 0\n"
    assert root_a_mark(card) == ROOT_A_MARK
    # What the card holds passes first boot's own check.
    extracted = tmp_path / "edge-provision.toml"
    extracted.write_text(esp_read(card, "edge-provision.toml"))
    check = edge("--config", str(REPO / "edge.toml"), "provision", "--from-file", str(extracted), "--check")
    assert (check.returncode, check.stdout) == (0, "ok\n"), check.stderr


def test_writing_again_replaces_the_file_and_show_masks_the_credentials(tmp_path: Path) -> None:
    card = make_card(tmp_path / "card.img")
    first = edge("provision", "--image-file", str(card), *PROVISION_ARGS, stdin="first-t0ken\n", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    # The engineer typed the wrong node id: runs it again with the right one.
    again = edge("provision", "--image-file", str(card), "--node-id", "clinic-0043", "--token", "second-t0ken", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert esp_names(card) == ["edge-provision.toml", "loader"]  # one file, not two
    written = tomllib.loads(esp_read(card, "edge-provision.toml"))
    assert written["node"] == {"id": "clinic-0043"} and written["secrets"] == {"token": "second-t0ken"}

    shown = edge("provision", "--image-file", str(card), "--show", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert 'id = "clinic-0043"' in shown.stdout and 'token = "****"' in shown.stdout
    assert "t0ken" not in shown.stdout
    assert "first boot failed" not in shown.stdout


def test_the_engineer_sees_why_the_last_first_boot_failed_and_the_reason_stays_on_the_card(tmp_path: Path) -> None:
    card = make_card(tmp_path / "card.img")
    key = base64.b64encode(os.urandom(32)).decode()
    esp_put(card, "edge-provision.toml", f'[dicom]\nport = "eleven"\n[disk]\nluks_key = "{key}"\n')
    esp_put(card, "firstboot-error.txt", "Clinic Edge first boot failed (2025-01-01T00:00:00Z):\n"
            "edge provision: /boot/efi/edge-provision.toml: [dicom] port: Input should be a valid integer\x1b[2J\n")
    shown = edge("provision", "--image-file", str(card), "--show", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "the last first boot failed:" in shown.stdout and "[dicom] port: Input should be a valid integer" in shown.stdout
    assert "\x1b" not in shown.stdout  # the card's text cannot drive the engineer's terminal
    assert 'luks_key = "****"' in shown.stdout and key not in shown.stdout

    fixed = edge("provision", "--image-file", str(card), "--node-id", "clinic-0042", cwd=tmp_path)
    assert fixed.returncode == 0, fixed.stderr
    assert "the last first boot failed:" in fixed.stdout
    # First boot removes the reason once it succeeds; until then it stays for the next look.
    assert "firstboot-error.txt" in esp_names(card)


def test_a_bad_value_is_refused_on_the_laptop_and_the_card_is_left_as_it_was(tmp_path: Path) -> None:
    card = make_card(tmp_path / "card.img")
    before = card.read_bytes()
    result = edge("provision", "--image-file", str(card), "--node-id", "Clinic 42!", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("edge provision: edge-provision.toml: [node] id:") and result.stderr.count("\n") == 1
    assert card.read_bytes() == before


def _not_a_card(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.img"
    if kind == "missing":
        return path
    if kind == "folder":
        path.mkdir()
    elif kind == "blank":
        subprocess.run(["truncate", "-s", "8M", str(path)], check=True)
    elif kind == "mbr":
        make_card(path, label="dos")
    elif kind == "no-esp":
        make_card(path, esp_type=SLOT_TYPE, name="data")
    elif kind == "compressed":
        path = tmp_path / "card.img.zst"
        path.write_bytes(b"\x28\xb5\x2f\xfd" + os.urandom(64))
    elif kind == "read-only":
        make_card(path)
        path.chmod(0o444)
    return path


@pytest.mark.parametrize(("kind", "says"), [
    ("missing", "not found"),
    ("folder", "a folder, not an image file (a mounted ESP takes --image-boot DIR)"),
    ("blank", "no GPT partition table"),
    ("mbr", "no GPT (a dos partition table"),
    ("no-esp", "no ESP (no partition of type EFI System or named 'esp')"),
    ("compressed", "zstd-compressed; unpack it first (unzstd"),
    ("read-only", "read-only (chmod u+w it, or write a copy of the image)"),
])
def test_what_is_not_a_writable_card_image_is_named_in_one_line(tmp_path: Path, kind: str, says: str) -> None:
    path = _not_a_card(tmp_path, kind)
    before = path.read_bytes() if path.is_file() else None
    result = edge("provision", "--image-file", str(path), "--node-id", "clinic-0042", cwd=tmp_path)
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith(f"edge provision: {path}: ") and says in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    if before is not None:
        assert path.read_bytes() == before


def test_without_mtools_the_engineer_is_told_which_debian_package_to_install(tmp_path: Path) -> None:
    card = make_card(tmp_path / "card.img")
    bin_dir = tmp_path / "bin"  # a laptop with fdisk but without mtools
    bin_dir.mkdir()
    (bin_dir / "sfdisk").symlink_to(shutil.which("sfdisk") or "/usr/sbin/sfdisk")
    result = edge("provision", "--image-file", str(card), "--node-id", "clinic-0042", cwd=tmp_path,
                  env={"PATH": str(bin_dir)})
    assert result.returncode == 2
    assert "needs mtools" in result.stderr and "apt-get install mtools" in result.stderr and "fdisk" not in result.stderr


# --check: first boot's gate (image/firstboot.sh, stage disk), before anything is changed.

def _node_dir(tmp_path: Path) -> tuple[Path, Path]:
    """The appliance's shipped config, its data_dir moved under tmp_path; returns (config, data_dir)."""
    config_dir = tmp_path / "usr-lib-clinic-edge"
    config_dir.mkdir()
    data_dir = tmp_path / "data"  # not made: first boot runs before the data partition exists
    text = subprocess.run([str(REPO / "image" / "appliance-config.sh")], capture_output=True, text=True, check=True).stdout
    text = text.replace('data_dir = "/var/lib/clinic-edge/data"', f'data_dir = "{data_dir}"')
    assert str(data_dir) in text
    (config_dir / "edge.toml").write_text(text)
    return config_dir / "edge.toml", data_dir


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


GOOD_FILE = (
    '[node]\nid = "clinic-0042"\nname = "Gugulethu Day Clinic"\n'
    '[dicom]\nae_title = "GUGU_EDGE"\nmodality_host = "10.0.0.20"\nmodality_port = 104\n'
    '[cloud]\ndicomweb_url = "https://pacs.example.org/dicom-web"\n'
    '[kiosk]\nlanguages = ["en", "zu"]\n'
    '[secrets]\ntoken = "t0ken"\n'
    '[console_tls]\nhosts = ["reception-edge"]\n'
    '[disk]\nluks_key = "' + base64.b64encode(b"k" * 32).decode() + '"\n'
)


def test_check_passes_a_good_file_prints_ok_and_writes_nothing(tmp_path: Path) -> None:
    config, data_dir = _node_dir(tmp_path)
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "edge-provision.toml").write_text(GOOD_FILE)
    before = _tree(tmp_path)
    result = edge("--config", str(config), "provision", "--from-file", str(boot / "edge-provision.toml"), "--check",
                  cwd=tmp_path, env={"PYTHONDONTWRITEBYTECODE": "1"})
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", "")
    assert _tree(tmp_path) == before  # no secrets file, no film key, no certificate, no data_dir, no log
    assert not data_dir.exists()


@pytest.mark.parametrize(("bad", "named"), [
    ('[dicom]\nport = "eleven"\n', "[dicom] port: Input should be a valid integer"),
    ('[dicom]\nportt = 11112\n', "[dicom] portt: unknown key"),
    ('[dicomm]\nport = 11112\n', "dicomm: unknown key"),
    ('[node]\nid = "Clinic 42!"\n', "[node] id: String should match pattern"),
    ('[secrets]\ntokn = "t0ken"\n', "[secrets] unknown key(s) tokn"),
    ('[disk]\nluks_key = "c2hvcnQ="\n', "[disk] luks_key must be at least 32 random bytes"),
    ('[node\nid = 1\n', "cannot read"),
])
def test_check_names_the_bad_key_in_one_line_and_writes_nothing(tmp_path: Path, bad: str, named: str) -> None:
    config, _ = _node_dir(tmp_path)
    provision = tmp_path / "edge-provision.toml"
    provision.write_text(bad)
    before = _tree(tmp_path)
    result = edge("--config", str(config), "provision", "--from-file", str(provision), "--check",
                  cwd=tmp_path, env={"PYTHONDONTWRITEBYTECODE": "1"})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"edge provision: {provision}:") and named in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1
    assert _tree(tmp_path) == before


def test_check_blames_a_bad_node_config_not_the_provisioning_file(tmp_path: Path) -> None:
    config, _ = _node_dir(tmp_path)
    config.write_text(config.read_text().replace("port = 11112", 'port = "x"', 1))
    provision = tmp_path / "edge-provision.toml"
    provision.write_text(GOOD_FILE)
    result = edge("--config", str(config), "provision", "--from-file", str(provision), "--check", cwd=tmp_path)
    assert result.returncode == 2
    assert f"the node's own config is bad: {config}: [dicom] port" in result.stderr


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_check_opens_nothing_for_writing_so_it_runs_early_in_boot(tmp_path: Path) -> None:
    """No store opened, no log file, nothing under data_dir: before the data partition exists, / read-only."""
    config, data_dir = _node_dir(tmp_path)
    provision = tmp_path / "edge-provision.toml"
    provision.write_text(GOOD_FILE)
    trace = tmp_path / "trace.txt"
    script = Path(sys.executable).with_name("edge")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "edge"]
    result = subprocess.run(
        ["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=open,openat,creat,mkdir,mkdirat,rename,renameat,renameat2,unlink,unlinkat",
         *argv, "--config", str(config), "provision", "--from-file", str(provision), "--check"],
        capture_output=True, text=True, check=False, timeout=60, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
    )
    if result.returncode != 0 and "ptrace" in result.stderr:
        pytest.skip(f"strace cannot trace here: {result.stderr.strip()}")
    assert (result.returncode, result.stdout) == (0, "ok\n"), result.stderr
    writes = [line for line in trace.read_text().splitlines()
              if any(flag in line for flag in ("O_WRONLY", "O_RDWR", "O_CREAT", "mkdir", "rename", "unlink", "creat("))
              and "= -1 " not in line and "/dev/null" not in line and "/dev/tty" not in line]
    assert writes == []
    assert not data_dir.exists()


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_writing_a_card_image_mounts_nothing_and_makes_no_loop_device(tmp_path: Path) -> None:
    """What lets a field engineer do it on a laptop without root: only file reads and writes on the image."""
    card = make_card(tmp_path / "card.img")
    trace = tmp_path / "trace.txt"
    script = Path(sys.executable).with_name("edge")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "edge"]
    result = subprocess.run(
        ["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=mount,umount2,open,openat,ioctl",
         *argv, "provision", "--image-file", str(card), "--node-id", "clinic-0042"],
        capture_output=True, text=True, check=False, timeout=60, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if result.returncode != 0 and "ptrace" in result.stderr:
        pytest.skip(f"strace cannot trace here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    calls = trace.read_text()
    assert "mount(" not in calls and "/dev/loop" not in calls and "LOOP_" not in calls
    assert str(card) in calls  # the trace did see mtools open the image
    assert tomllib.loads(esp_read(card, "edge-provision.toml"))["node"] == {"id": "clinic-0042"}


def test_a_new_disk_key_goes_onto_the_card_and_into_an_escrow_file_never_over_another(tmp_path: Path) -> None:
    card = make_card(tmp_path / "card.img")
    escrow = tmp_path / "clinic-0042.key"
    result = edge("--config", str(tmp_path / "absent.toml"), "provision", "--image-file", str(card),
                  "--node-id", "clinic-0042", "--new-disk-key", str(escrow))
    assert result.returncode == 0, result.stderr
    assert "give it to central ops" in result.stdout
    assert escrow.stat().st_mode & 0o777 == 0o600
    key = escrow.read_text().strip()
    assert len(base64.b64decode(key, validate=True)) == 32
    assert tomllib.loads(esp_read(card, "edge-provision.toml"))["disk"] == {"luks_key": key}
    # A second card with the same escrow name would lose the first box's only spare key: refused.
    again = edge("--config", str(tmp_path / "absent.toml"), "provision", "--image-file", str(card),
                 "--node-id", "clinic-0042", "--new-disk-key", str(escrow))
    assert again.returncode != 0 and "exists" in again.stderr
    assert escrow.read_text().strip() == key
    assert tomllib.loads(esp_read(card, "edge-provision.toml"))["disk"] == {"luks_key": key}
