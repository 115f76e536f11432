"""Files that survive a power cut: written whole or not at all, and their folder entry made durable.

The node runs on a box whose power is pulled; a rename is only durable once its folder is
fsynced, and a file only whole once its data is. Every place that publishes a file (a kept
instance, a fetched report, provisioned secrets) does it through these few functions, so
"durable" means one thing.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(written: Path, dest: Path) -> None:
    """Rename a written and fsynced file into place, and fsync the folder: ``dest`` is whole or absent."""
    os.replace(written, dest)
    fsync_dir(dest.parent)


def write_durably(path: Path, data: bytes, mode: int | None = None, owner: tuple[int, int] | None = None) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder: whole or absent after a power cut.

    ``mode``: the file's permissions exactly (default: as ``open()`` makes it, under the umask);
    ``owner``: (uid, gid) to give it before it appears (root provisioning the node's secrets).
    A failure leaves no temp file behind.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            if mode is not None:
                os.fchmod(handle.fileno(), mode)
            if owner is not None:
                os.fchown(handle.fileno(), *owner)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
