"""``edge update BUNDLE``: install an update bundle into the slot that is not running, with a boot counter.

Run as root on the appliance. The order makes a power cut at any moment safe:

1. The whole bundle is read and checked (manifest, every size and SHA-256, the root fits the
   partition) before anything is written; a bad bundle is refused with one line.
2. The other slot's old entries go first (so nothing can boot a half-written slot), then its
   kernel files on the ESP.
3. root.squashfs is written into the other partition (fsync, then read back past the page
   cache and checked again), the kernel, initrd and manifest onto the ESP (temp + fsync +
   rename), all hashed again on the way (the stick must not change between the passes).
4. Last, the entry ``clinic-edge-<generation>-<slot>+<tries>.conf`` (temp + fsync + rename):
   systemd-boot boots it next, systemd-bless-boot drops the counter once boot-complete.target
   is reached (image/edge-boot-check.service), and after ``tries`` failed boots systemd-boot
   goes back to the old slot (edge.appliance.boot explains the order).
5. ``systemctl reboot`` unless ``--no-reboot``.

The running slot's own entry is never touched: it is the way back.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge.appliance.boot import entry_filename, entry_text, next_generation, other_slot
from edge.appliance.bundle import MANIFEST, BundleError, file_digest, read_bundle
from edge.appliance.slots import (
    Appliance,
    entry_names,
    read_slot_state,
    running_slot,
    write_state,
)

DEFAULT_TRIES = 3
ESP_FILES = ("vmlinuz", "initrd.img")


class UpdateError(Exception):
    """The update cannot go ahead (or stopped); one line saying why and what to do."""


@dataclass(frozen=True)
class Installed:
    version: str
    slot: str
    entry: str
    partition: Path


def device_bytes(path: Path) -> int:
    """A partition's size, by seeking to its end (a block device's st_size is 0)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; os.sync() follows anyway
        pass
    finally:
        os.close(fd)


def _check_not_running_root(appliance: Appliance, target: Path) -> None:
    """The target partition must not be the mounted root (a wrong partlabel would wipe the node)."""
    try:
        st = os.stat(target)
        root = os.stat(appliance.root)
    except OSError:
        return
    if st.st_rdev and st.st_rdev == root.st_dev:
        raise UpdateError(f"{target} is the running root: refusing to write over it")


class _PartitionWriter:
    """Writes root.squashfs from offset 0 of the partition (or the test's file), never past its end."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path, self.limit, self.written = path, limit, 0
        self.fd = os.open(path, os.O_WRONLY)

    def __call__(self, chunk: bytes) -> None:
        if self.written + len(chunk) > self.limit:
            raise BundleError(f"root.squashfs would run past the end of {self.path}")
        view = memoryview(chunk)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.written += len(chunk)

    def finish(self) -> None:
        os.fsync(self.fd)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the read-back below comes from the disk
        os.close(self.fd)

    def abort(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


class _EspWriter:
    """A slot file onto the ESP (FAT): written to a temp name, fsynced, renamed by commit()."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.tmp = final.with_name(final.name + ".tmp")
        self.handle = open(self.tmp, "wb")  # noqa: SIM115 - closed in commit/abort

    def __call__(self, chunk: bytes) -> None:
        self.handle.write(chunk)

    def commit(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        self.handle.close()
        self.tmp.unlink(missing_ok=True)


def _write_esp_file(path: Path, data: bytes) -> None:
    writer = _EspWriter(path)
    try:
        writer(data)
        writer.commit()
    except BaseException:
        writer.abort()
        raise


def _read_back(path: Path, size: int) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        remaining = size
        while remaining:
            chunk = handle.read(min(1 << 20, remaining))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


def install(bundle: Path, appliance: Appliance, tries: int = DEFAULT_TRIES, say: Callable[[str], None] = print) -> Installed:
    """Check, then write the bundle into the other slot with a boot counter (see the module docstring)."""
    if tries < 1:
        raise UpdateError(f"--tries must be at least 1, not {tries}")
    slot = running_slot(appliance)
    if slot is None:
        raise UpdateError(f"not running on the appliance: no edge.slot= in {appliance.cmdline}")
    target_slot = other_slot(slot)
    target = appliance.partition(target_slot)
    if not target.exists():
        raise UpdateError(f"slot {target_slot}'s partition {target} is missing")
    _check_not_running_root(appliance, target)
    try:
        names = entry_names(appliance)
    except OSError as exc:
        raise UpdateError(f"cannot read the boot entries in {appliance.entries_dir}: {exc.strerror or exc} (run as root)") from None
    state = read_slot_state(appliance, slot)
    if state.update is not None and state.update.state == "trial":
        raise UpdateError(
            f"slot {slot} is still on trial ({state.update.entry}): wait until the node is up and systemd-bless-boot "
            "has marked it good, or the old slot would be the only one left to fall back to and be overwritten"
        )
    slot_bytes = device_bytes(target)

    # 1. The whole bundle, checked; nothing written yet.
    say(f"checking {bundle} ...")
    try:
        manifest = read_bundle(bundle, slot_bytes)
    except BundleError as exc:
        raise UpdateError(f"bundle refused, nothing written: {exc}") from None
    say(f"bundle {manifest.version} ({manifest.commit}) is whole: root {manifest.root_bytes} bytes, slot {target_slot} has {slot_bytes}")

    # 2. Nothing may boot the other slot while it is rewritten.
    for name in names:
        if name.slot == target_slot:
            (appliance.entries_dir / name.filename).unlink()
            say(f"removed the old entry {name.filename}")
    _fsync_dir(appliance.entries_dir)
    slot_dir = appliance.slot_dir(target_slot)
    slot_dir.mkdir(parents=True, exist_ok=True)
    for stale in (*ESP_FILES, MANIFEST):
        (slot_dir / stale).unlink(missing_ok=True)
    _fsync_dir(slot_dir)
    os.sync()

    # 3. The slot's files, hashed again on the way.
    partition = _PartitionWriter(target, slot_bytes)
    esp_writers = {name: _EspWriter(slot_dir / name) for name in ESP_FILES}

    def sink(name: str) -> Callable[[bytes], object]:
        return partition if name == "root.squashfs" else esp_writers[name]

    say(f"writing slot {target_slot} ({target}) ...")
    try:
        again = read_bundle(bundle, slot_bytes, sink)
        if again.raw != manifest.raw:
            raise BundleError("the bundle changed since it was checked")
        partition.finish()
        for writer in esp_writers.values():
            writer.commit()
    except (BundleError, OSError) as exc:
        partition.abort()
        for writer in esp_writers.values():
            writer.abort()
        raise UpdateError(f"writing slot {target_slot} stopped, it has no boot entry and will not be booted: {exc}") from None
    size, sha = manifest.files["root.squashfs"]
    if _read_back(target, size) != sha:
        raise UpdateError(f"slot {target_slot} reads back different from the bundle: the card may be failing; it has no boot entry")
    for esp_file in ESP_FILES:
        if file_digest(slot_dir / esp_file) != manifest.files[esp_file][1]:
            raise UpdateError(f"{slot_dir / esp_file} reads back different from the bundle: the ESP may be failing")
    _write_esp_file(slot_dir / MANIFEST, manifest.raw)
    _fsync_dir(slot_dir)

    # 4. The entry, last.
    entry = entry_filename(target_slot, next_generation(names), tries)
    _write_esp_file(appliance.entries_dir / entry, entry_text(target_slot, manifest.version).encode())
    _fsync_dir(appliance.entries_dir)
    os.sync()
    say(f"slot {target_slot} holds {manifest.version}; boot entry {entry} ({tries} tries, then back to slot {slot})")
    try:
        write_state(read_slot_state(appliance, slot), appliance.state_file)
    except OSError as exc:
        say(f"note: cannot write {appliance.state_file} ({exc.strerror or exc}); edge status shows it after the reboot")
    return Installed(manifest.version, target_slot, entry, target)


def run(bundle: Path, tries: int = DEFAULT_TRIES, reboot: bool = True, appliance: Appliance | None = None) -> int:
    """The command: 0 installed (and rebooting), 1 refused or failed, with the reason on stderr."""
    appliance = appliance or Appliance.from_env()
    try:
        installed = install(bundle, appliance, tries)
    except UpdateError as exc:
        print(f"edge update: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"edge update: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if not reboot:
        print(f"not rebooting (--no-reboot): the next boot starts {installed.version} in slot {installed.slot}")
        return 0
    print("rebooting into the update ...")
    result = subprocess.run(["systemctl", "reboot"], check=False)
    if result.returncode != 0:
        print("edge update: systemctl reboot failed; reboot the box to start the update", file=sys.stderr)
        return 1
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="clinic-edge-<version>.update: a file, or a block device holding it")
    parser.add_argument("--tries", type=int, default=DEFAULT_TRIES,
                        help=f"boots the update gets to come up before going back to this slot (default {DEFAULT_TRIES})")
    parser.add_argument("--no-reboot", action="store_true", help="install only; the update starts at the next boot")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m edge.appliance.update", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args.bundle, args.tries, not args.no_reboot)


if __name__ == "__main__":
    sys.exit(main())
