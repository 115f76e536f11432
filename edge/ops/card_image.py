"""The ESP of a card image (a raw GPT disk), read and written without mounting and without root.

A field engineer prepares cards on a laptop: ``edge provision --image-file IMG`` finds the
ESP in the image's GPT (``sfdisk --json``) and writes ``edge-provision.toml`` into that
FAT partition with mtools at its byte offset (``mcopy -i IMG@@OFFSET``). Nothing is
mounted, no loop device is made, so no root is needed; the image may also be a card in a
reader (a block device the user may write).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from edge.ops.provision import ProvisionError

# The EFI System partition's GPT type; build.sh also names it "esp".
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ESP_NAME = "esp"
FIRSTBOOT_ERROR_FILE_NAME = "firstboot-error.txt"  # image/firstboot.sh leaves the reason here
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_TOOLS = {"sfdisk": "fdisk", "mcopy": "mtools", "mtype": "mtools", "mdir": "mtools"}


def _mtools_env() -> dict[str, str]:
    # An image file has no drive geometry for mtools to check; a user's ~/.mtoolsrc must not matter either.
    return {**os.environ, "MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": "/dev/null"}


def _run(argv: list[str], what: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(argv, input=data, capture_output=True, check=False, env=_mtools_env(), timeout=120)
    except subprocess.TimeoutExpired:
        raise ProvisionError(f"{what}: {argv[0]} did not finish in 120 s") from None


@dataclass(frozen=True)
class CardImage:
    """One card image and where its ESP starts; files are named by their path on the ESP (``/edge-provision.toml``)."""

    path: Path
    esp_offset: int

    @property
    def _drive(self) -> str:
        return f"{self.path}@@{self.esp_offset}"

    def names(self) -> set[str]:
        """The file names in the ESP's top folder."""
        result = _run(["mdir", "-b", "-i", self._drive, "::/"], str(self.path))
        if result.returncode != 0:
            raise ProvisionError(f"{self.path}: cannot read the ESP: {_reason(result)}")
        return {line.rstrip("/").rsplit("/", 1)[-1] for line in result.stdout.decode("utf-8", "replace").splitlines() if line.strip()}

    def read(self, name: str) -> bytes | None:
        """A file's bytes, or None when the ESP has no such file."""
        if name not in self.names():
            return None
        result = _run(["mtype", "-i", self._drive, f"::/{name}"], str(self.path))
        if result.returncode != 0:
            raise ProvisionError(f"{self.path}: cannot read {name} from the ESP: {_reason(result)}")
        return result.stdout

    def write(self, name: str, data: bytes) -> None:
        """``name`` on the ESP holds ``data``, replacing what was there; read back to be sure, then flushed.

        The bytes go through mcopy's stdin, so credentials never sit in a temp file on the laptop.
        """
        if not os.access(self.path, os.W_OK) or not self.path.stat().st_mode & 0o222:  # even root honours a 444 image
            raise ProvisionError(f"{self.path}: read-only (chmod u+w it, or write a copy of the image)")
        result = _run(["mcopy", "-D", "o", "-i", self._drive, "-", f"::/{name}"], str(self.path), data)
        if result.returncode != 0:
            raise ProvisionError(f"{self.path}: cannot write {name} to the ESP: {_reason(result)}")
        if self.read(name) != data:
            raise ProvisionError(f"{self.path}: {name} on the ESP does not read back as written")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)  # a card in a reader: on the card before the engineer pulls it
        finally:
            os.close(fd)


def _reason(result: subprocess.CompletedProcess[bytes]) -> str:
    text = (result.stderr or result.stdout).decode("utf-8", "replace").strip()
    return " ".join(text.split()) or f"exit {result.returncode}"


def _need_tools() -> None:
    missing = sorted({package for tool, package in _TOOLS.items() if shutil.which(tool) is None})
    if missing:
        raise ProvisionError(f"needs {' and '.join(missing)} to write a card image without mounting it "
                             f"(Debian/Ubuntu: apt-get install {' '.join(missing)})")


def open_card_image(path: Path) -> CardImage:
    """The image and its ESP, or a ProvisionError saying plainly why this is not a card image."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ProvisionError(f"{path}: not found") from None
    except OSError as exc:
        raise ProvisionError(f"{path}: cannot read: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        raise ProvisionError(f"{path}: a folder, not an image file (a mounted ESP takes --image-boot DIR)")
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise ProvisionError(f"{path}: not a file (give the raw clinic-edge-<version>.img)")
    _need_tools()
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ProvisionError(f"{path}: cannot read: {exc.strerror}") from None
    if head == _ZSTD_MAGIC:
        raise ProvisionError(f"{path}: zstd-compressed; unpack it first (unzstd {path}) and give the .img")
    result = _run(["sfdisk", "--json", str(path)], str(path))
    if result.returncode != 0:
        raise ProvisionError(f"{path}: no GPT partition table ({_reason(result)}): not a Clinic Edge card image")
    try:
        table = json.loads(result.stdout)["partitiontable"]
    except (ValueError, KeyError):
        raise ProvisionError(f"{path}: sfdisk printed no partition table") from None
    if table.get("label") != "gpt":
        raise ProvisionError(f"{path}: no GPT (a {table.get('label')} partition table or a bare filesystem): "
                             "not a Clinic Edge card image")
    sector = int(table.get("sectorsize", 512))
    for part in table.get("partitions", []):
        if str(part.get("type", "")).upper() == ESP_TYPE or part.get("name") == ESP_NAME:
            return CardImage(path, int(part["start"]) * sector)
    raise ProvisionError(f"{path}: no ESP (no partition of type EFI System or named {ESP_NAME!r}): not a Clinic Edge card image")
