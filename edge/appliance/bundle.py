"""An update bundle: one slot's files and the manifest that vouches for them.

A bundle is an uncompressed tar (``clinic-edge-<version>.update``) of ``manifest.json``
first, then ``vmlinuz``, ``initrd.img`` and ``root.squashfs``. The manifest gives each
file's size and SHA-256, so a truncated or corrupt bundle is refused before a byte of it
is written to the inactive slot; the manifest's own ``digest`` (SHA-256 of the rest of it,
canonical JSON) catches a flipped byte in the manifest itself.

The bundle is read strictly front to back (tarfile's stream mode), never by its size: it
may be a regular file or a block device (a USB stick, a virtio disk) holding the raw tar,
with whatever was on the stick before after it. Reading stops after the last slot file.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

SLOT_FILES = ("vmlinuz", "initrd.img", "root.squashfs")
MANIFEST = "manifest.json"
FORMAT = 1
CHUNK = 1 << 20
MANIFEST_MAX_BYTES = 64 * 1024
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+~_-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BundleError(Exception):
    """The bundle cannot be installed; the message is one line a field engineer can act on."""


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB pieces (a root is hundreds of MB on a 1 GB box)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest without its ``digest`` key, as canonical JSON."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def make_manifest(slot_dir: Path, version: str, commit: str, slot_bytes: int) -> dict[str, object]:
    """What build.sh writes beside a slot's files (and into the bundle)."""
    files = {name: {"size": (slot_dir / name).stat().st_size, "sha256": file_digest(slot_dir / name)} for name in SLOT_FILES}
    root_size = (slot_dir / "root.squashfs").stat().st_size
    if root_size > slot_bytes:
        raise SystemExit(f"manifest: root.squashfs is {root_size} bytes, more than a slot's {slot_bytes}")
    if not _VERSION.match(version):
        raise SystemExit(f"manifest: version {version!r} is not a plain version string")
    manifest: dict[str, Any] = {"format": FORMAT, "version": version, "commit": commit, "slot_bytes": slot_bytes, "files": files}
    manifest["digest"] = manifest_digest(manifest)
    return manifest


@dataclass(frozen=True)
class Manifest:
    """A checked manifest: the version it installs and each slot file's size and SHA-256."""

    version: str
    commit: str
    slot_bytes: int
    files: dict[str, tuple[int, str]]
    raw: bytes

    @property
    def root_bytes(self) -> int:
        return self.files["root.squashfs"][0]


def parse_manifest(raw: bytes) -> Manifest:
    """The manifest's format checked field by field; BundleError names what is wrong."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"manifest.json is not valid JSON ({exc}): the bundle is corrupt") from None
    if not isinstance(data, dict):
        raise BundleError("manifest.json is not a JSON object: the bundle is corrupt")
    if data.get("format") != FORMAT:
        raise BundleError(f"manifest.json has format {data.get('format')!r}; this node installs format {FORMAT} only")
    if data.get("digest") != manifest_digest(data):
        raise BundleError("manifest.json does not match its own digest: the bundle is corrupt")
    version, commit, slot_bytes, files = data.get("version"), data.get("commit"), data.get("slot_bytes"), data.get("files")
    if not isinstance(version, str) or not _VERSION.match(version):
        raise BundleError(f"manifest.json: version {version!r} is not a plain version string")
    if not isinstance(commit, str):
        raise BundleError("manifest.json: commit is missing")
    if not isinstance(slot_bytes, int) or isinstance(slot_bytes, bool) or slot_bytes <= 0:
        raise BundleError(f"manifest.json: slot_bytes {slot_bytes!r} is not a positive integer")
    if not isinstance(files, dict) or sorted(files) != sorted(SLOT_FILES):
        raise BundleError(f"manifest.json: files must be exactly {', '.join(SLOT_FILES)}")
    checked: dict[str, tuple[int, str]] = {}
    for name in SLOT_FILES:
        entry = files[name]
        size = entry.get("size") if isinstance(entry, dict) else None
        sha = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(sha, str) or not _SHA256.match(sha):
            raise BundleError(f"manifest.json: {name} needs a size and a sha256")
        checked[name] = (size, sha)
    return Manifest(version=version, commit=commit, slot_bytes=slot_bytes, files=checked, raw=raw)


Sink = Callable[[str], "Callable[[bytes], object] | None"]
"""Given a slot file's name, where its bytes go (None: only hashed)."""


@contextmanager
def _open(source: Path) -> Iterator[BinaryIO]:
    try:
        handle = open(source, "rb", buffering=0)  # noqa: SIM115 - closed below; unbuffered: tarfile reads big pieces
    except OSError as exc:
        raise BundleError(f"cannot read {source}: {exc.strerror or exc}") from None
    with handle:
        yield handle  # type: ignore[misc]


def read_bundle(source: Path, slot_bytes: int, sink: Sink | None = None) -> Manifest:
    """Stream the bundle once, front to back: check the manifest, every slot file's size and
    SHA-256, and that the root fits ``slot_bytes`` (the target partition's real size).

    With ``sink``, each slot file's bytes are also handed to where it goes as they pass; the
    caller must then treat a BundleError as "what was written is not to be booted". Without
    it nothing is written anywhere: that is the check before an update touches the slot.
    """
    seen: list[str] = []
    manifest: Manifest | None = None
    try:
        with _open(source) as handle, tarfile.open(fileobj=handle, mode="r|", bufsize=CHUNK) as tar:
            while True:
                member = tar.next()
                if member is None:
                    break
                name = member.name.removeprefix("./")
                if manifest is None:
                    if name != MANIFEST or not member.isreg():
                        raise BundleError(f"the bundle starts with {name!r}, not {MANIFEST}: not a Clinic Edge update bundle")
                    if member.size > MANIFEST_MAX_BYTES:
                        raise BundleError(f"{MANIFEST} is {member.size} bytes: not a Clinic Edge manifest")
                    manifest = parse_manifest(_read_member(tar, member, MANIFEST))
                    if manifest.root_bytes > slot_bytes:
                        raise BundleError(
                            f"root.squashfs is {manifest.root_bytes} bytes, more than the slot's {slot_bytes}: "
                            "this bundle is for a bigger card layout"
                        )
                    continue
                if name not in SLOT_FILES or not member.isreg():
                    raise BundleError(f"unexpected {name!r} in the bundle (only {MANIFEST}, {', '.join(SLOT_FILES)})")
                if name in seen:
                    raise BundleError(f"{name} appears twice in the bundle")
                size, sha = manifest.files[name]
                if member.size != size:
                    raise BundleError(f"{name} is {member.size} bytes in the bundle, the manifest says {size}: the bundle is corrupt")
                write = sink(name) if sink is not None else None
                digest = _stream_member(tar, member, name, write)
                if digest != sha:
                    raise BundleError(f"{name} does not match its SHA-256 in the manifest: the bundle is corrupt")
                seen.append(name)
                if len(seen) == len(SLOT_FILES):
                    break  # a block device goes on with whatever was on it before: stop here
    except tarfile.TarError as exc:
        where = f" after {seen[-1]}" if seen else (f" in {MANIFEST}" if manifest is None else "")
        raise BundleError(f"the bundle is truncated or corrupt{where} ({exc})") from None
    except OSError as exc:
        raise BundleError(f"cannot read {source}: {exc.strerror or exc}") from None
    if manifest is None:
        raise BundleError(f"{source} is empty or not a tar: not a Clinic Edge update bundle")
    missing = [n for n in SLOT_FILES if n not in seen]
    if missing:
        raise BundleError(f"the bundle ends before {', '.join(missing)}: it is truncated or corrupt (copy it again)")
    return manifest


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> bytes:
    parts: list[bytes] = []
    _stream_member(tar, member, name, parts.append)
    return b"".join(parts)


def _stream_member(tar: tarfile.TarFile, member: tarfile.TarInfo, name: str, write: Callable[[bytes], object] | None) -> str:
    """Hash (and hand on) one member's bytes; a short read is a truncated bundle."""
    reader = tar.extractfile(member)
    assert reader is not None  # a regular file
    digest = hashlib.sha256()
    remaining = member.size
    while remaining:
        chunk = reader.read(min(CHUNK, remaining))
        if not chunk:
            raise BundleError(f"the bundle ends inside {name} ({member.size - remaining} of {member.size} bytes): it is truncated")
        digest.update(chunk)
        if write is not None:
            write(chunk)
        remaining -= len(chunk)
    return digest.hexdigest()


def verify_bundle(source: Path, slot_bytes: int) -> Manifest:
    """The check before anything is written: the whole bundle read once, nothing kept but the manifest."""
    return read_bundle(source, slot_bytes)


if __name__ == "__main__":  # python3 -m edge.appliance.bundle SLOT_DIR VERSION COMMIT SLOT_BYTES
    slot, version, commit, slot_bytes = sys.argv[1:5]
    print(json.dumps(make_manifest(Path(slot), version, commit, int(slot_bytes)), indent=2, sort_keys=True))
