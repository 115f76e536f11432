"""The temp file pynetdicom streams a received dataset into, made to survive a full disk.

pynetdicom (``STORE_RECV_CHUNKED_DATASET``) writes each incoming P-DATA fragment to a
``tempfile.NamedTemporaryFile`` and aborts the association if a write raises. A disk that
fills mid-transfer would then show the DR "peer aborted" instead of the Out of Resources
status a technician can act on. This wrapper remembers the failure instead, frees what
was written, and swallows the rest of the dataset; the C-STORE handler then asks
:func:`ran_out_of_space` and answers 0xA700. pynetdicom removes the file after the handler.

Installed by replacing the name pynetdicom looks up (``dimse_messages.NamedTemporaryFile``):
a library internal, checked by the full-disk test on every run.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import threading
from typing import Any

from pynetdicom import dimse_messages

log = logging.getLogger(__name__)

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_full: set[str] = set()
_full_lock = threading.Lock()


class SpaceAwareTempFile:
    """A NamedTemporaryFile whose writes never raise for lack of space."""

    def __init__(self, **kwargs: Any) -> None:
        self._file = tempfile.NamedTemporaryFile(**kwargs)  # noqa: SIM115 - pynetdicom closes it
        self.name: str = self._file.name
        self.disk_full = False

    @property
    def file(self) -> SpaceAwareTempFile:
        """pynetdicom calls ``.file.flush()``; route it through the same guard."""
        return self

    def _out_of_space(self, exc: OSError) -> None:
        if exc.errno not in _NO_SPACE:
            raise exc
        if not self.disk_full:
            self.disk_full = True
            with _full_lock:
                _full.add(self.name)
            try:
                os.ftruncate(self._file.fileno(), 0)  # give back what this transfer took
            except OSError:
                pass
            log.error("dicom: disk full while receiving into %s: the rest of the dataset is discarded", os.path.basename(self.name))

    def write(self, data: bytes) -> int:
        if not self.disk_full:
            try:
                return self._file.write(data)
            except OSError as exc:
                self._out_of_space(exc)
        return len(data)

    def flush(self) -> None:
        if not self.disk_full:
            try:
                self._file.flush()
            except OSError as exc:
                self._out_of_space(exc)

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as exc:
            if exc.errno not in _NO_SPACE:
                raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def ran_out_of_space(path: os.PathLike[str] | str) -> bool:
    """Whether the disk filled while this dataset was received (asked once, by the handler)."""
    with _full_lock:
        try:
            _full.remove(str(path))
        except KeyError:
            return False
    return True


def install() -> None:
    """Make pynetdicom receive datasets into :class:`SpaceAwareTempFile`."""
    dimse_messages.NamedTemporaryFile = SpaceAwareTempFile  # type: ignore[assignment,misc]
