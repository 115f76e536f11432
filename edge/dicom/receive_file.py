"""The temp file pynetdicom streams a received dataset into: survives a full disk, stops at the size cap.

pynetdicom (``STORE_RECV_CHUNKED_DATASET``) writes each incoming P-DATA fragment to a
``tempfile.NamedTemporaryFile`` and aborts the association if a write raises. A disk that
fills mid-transfer would then show the DR "peer aborted" instead of the Out of Resources
status a technician can act on. This wrapper remembers the failure instead, frees what
was written, and swallows the rest of the dataset; the C-STORE handler then asks
:func:`ran_out_of_space` and answers 0xA700. pynetdicom removes the file after the handler.

A dataset that keeps coming past ``[storage] max_instance_mb`` (:func:`set_max_bytes`) is
treated the same way: what was written is freed, the rest swallowed, and the handler
(:func:`passed_max_bytes`) answers 0xA700 when the data ends, as it would for an instance
that just fits on disk but is too large. So one endless C-STORE cannot fill the disk (free
space is otherwise refused only at ``min_free_mb``, after the data has arrived); received
bytes past the cap are read and dropped, as long as the peer keeps its PDU deadlines, which
costs the node no more than a modality sending images back to back.

The file is made in the spool's temp folder (:func:`set_temp_dir`, passed as ``dir=``), on the
data disk, so keep_instance's rename into place is atomic and a power cut leaves it where
reconcile looks; ``tempfile.tempdir`` stays the process's (the kiosk's and sync's temp files).

Installed by replacing the name pynetdicom looks up (``dimse_messages.NamedTemporaryFile``):
a library internal (edge.dicom.patches), checked by the full-disk test on every run.
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
# The file meta pynetdicom writes before the dataset (a few hundred bytes) fits in this: a
# dataset is cut only when the walk (edge.store.walk) would refuse it too.
_FILE_META_ALLOWANCE = 64 * 1024
_full: set[str] = set()
_too_large: set[str] = set()
_full_lock = threading.Lock()
_max_bytes: int | None = None
_temp_dir: str | None = None


class SpaceAwareTempFile:
    """A NamedTemporaryFile whose writes never raise for lack of space."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("dir", _temp_dir)  # pynetdicom passes none: on the data disk, not in /tmp
        self._file = tempfile.NamedTemporaryFile(**kwargs)  # noqa: SIM115 - pynetdicom closes it
        self.name: str = self._file.name
        self.disk_full = False
        self.too_large = False
        self._written = 0
        self._max_written = None if _max_bytes is None else _max_bytes + _FILE_META_ALLOWANCE

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
            log.error("disk full while receiving into %s: the rest of the dataset is discarded", os.path.basename(self.name))

    def _passed_max_bytes(self) -> None:
        self.too_large = True
        with _full_lock:
            _too_large.add(self.name)
        try:
            self._file.flush()
            os.ftruncate(self._file.fileno(), 0)  # what a refused instance took goes back at once
        except OSError:
            pass

    def write(self, data: bytes) -> int:
        if not (self.disk_full or self.too_large):
            self._written += len(data)
            if self._max_written is not None and self._written > self._max_written:
                self._passed_max_bytes()
                return len(data)
            try:
                return self._file.write(data)
            except OSError as exc:
                self._out_of_space(exc)
        return len(data)

    def flush(self) -> None:
        if not (self.disk_full or self.too_large):
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


def passed_max_bytes(path: os.PathLike[str] | str) -> bool:
    """Whether this dataset kept coming past ``set_max_bytes`` and was dropped (asked once, by the handler)."""
    with _full_lock:
        try:
            _too_large.remove(str(path))
        except KeyError:
            return False
    return True


def set_max_bytes(max_bytes: int) -> None:
    """The largest dataset a C-STORE may write to disk (``[storage] max_instance_mb``), process-wide."""
    global _max_bytes
    _max_bytes = max_bytes


def set_temp_dir(path: os.PathLike[str] | str) -> None:
    """Where received datasets are streamed (the spool's temp folder), process-wide."""
    global _temp_dir
    _temp_dir = os.fspath(path)


def install() -> None:
    """Make pynetdicom receive datasets into :class:`SpaceAwareTempFile`."""
    dimse_messages.NamedTemporaryFile = SpaceAwareTempFile  # type: ignore[assignment,misc]
