"""Whether the DICOM service can take the DR's next association, as a small file other processes read.

/healthz, /metrics and ``edge status`` must not open a connection to the DICOM port to find
out: each probe would take one of the DR's association slots, and under systemd they run
in other processes than the DICOM service. So the service writes ``<data_dir>/run/dicom.json``
every ``WRITE_EVERY_S`` and whenever a slot is taken or given back (atomic rename), and the
readers treat a missing file, or one not rewritten for ``STALE_AFTER_S``, as "not running".
This module is cheap to import (no pynetdicom): the console and the ops service read it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

WRITE_EVERY_S = 2.0
# A few missed writes: the service is gone (killed, hung) or its machine is too busy to answer anyway.
STALE_AFTER_S = 10.0


@dataclass(frozen=True)
class DicomAvailability:
    """The DICOM service's own view of its association slots."""

    pid: int
    updated_at: float  # Unix time of this write
    listening: bool  # the accept loop is running
    slots_used: int
    slots_max: int
    held_by_strangers: int  # slots held by peers that are not a configured modality
    accepting: bool  # a configured modality (with none configured: any peer) would get a slot now
    modalities_configured: bool


def state_path(data_dir: Path) -> Path:
    return data_dir / "run" / "dicom.json"


# Every write is padded to this size, so on a disk too full for a new file the old one can
# be overwritten in place (same blocks) and the readers still hear from the service.
_FILE_BYTES = 512


def write(data_dir: Path, state: DicomAvailability) -> None:
    """Replace the file in one rename, so a reader never sees half of it; in place when the disk is full."""
    path = state_path(data_dir)
    data = json.dumps(asdict(state)).encode().ljust(_FILE_BYTES)
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp.write_bytes(data)
        os.replace(temp, path)
    except OSError:
        with contextlib.suppress(OSError):
            temp.unlink()
        fd = os.open(path, os.O_WRONLY)  # no file to overwrite: the caller hears why
        try:
            os.pwrite(fd, data, 0)
        finally:
            os.close(fd)


def remove(data_dir: Path) -> None:
    """At a clean stop: the service is not running, say so at once instead of after STALE_AFTER_S."""
    try:
        state_path(data_dir).unlink()
    except FileNotFoundError:
        pass


def read(data_dir: Path) -> DicomAvailability | None:
    """The last state written, or None when there is none or it cannot be read."""
    for _ in range(2):  # a second look if it was caught mid-overwrite (the full-disk path)
        try:
            return DicomAvailability(**json.loads(state_path(data_dir).read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):
            continue
    return None


def age_s(state: DicomAvailability) -> float:
    return max(0.0, time.time() - state.updated_at)


def is_current(state: DicomAvailability | None) -> bool:
    """True when the service wrote it recently enough to be running."""
    return state is not None and state.listening and age_s(state) <= STALE_AFTER_S
