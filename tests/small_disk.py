"""A real, size-limited filesystem for full-disk tests (a tmpfs the test mounts; needs root)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def mounted_tmpfs(mount_point: Path, size_mb: int) -> Iterator[Path]:
    """``mount_point`` on its own ``size_mb`` filesystem; the test is skipped where mount is not allowed."""
    mount_point.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root / CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path, leave_mb: float = 0.0) -> Path:
    """Something else fills the disk (logs, a runaway process): ``leave_mb`` left, 0 = not a byte."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        if leave_mb:
            f.write(b"\0" * int(shutil.disk_usage(disk).free - leave_mb * 2**20))
        else:
            for chunk in (2**20, 2**16, 4096, 512):
                try:
                    while True:
                        f.write(b"\0" * chunk)
                except OSError:  # ENOSPC: on to smaller pieces
                    pass
    return filler
