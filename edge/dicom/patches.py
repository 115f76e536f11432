"""The node's changes to pynetdicom's internals, installed by ``DicomService.start()``, never at import.

Each reaches into a pynetdicom internal (the list, and why, is in ``edge/dicom/__init__.py``),
so each holds for the pynetdicom versions it was read against and no other: ``install()``
first checks ``pynetdicom.__version__`` and refuses an unknown one with a
:class:`~edge.service.ServiceSetupError` naming it, so an upgrade stops ``edge run`` with
one clear line instead of a node that aborts associations in ways no test has seen.

Importing any module of the node (``edge.dicom.service`` too) leaves pynetdicom as it is:
a tool that only reads the store, or a test that runs pynetdicom as a peer, gets the library
unchanged. ``install()`` is idempotent and process-wide, like pynetdicom's ``_config``.
"""

from __future__ import annotations

import logging
import threading
import warnings

import pynetdicom
from pydicom.uid import UID
from pynetdicom import _config

from edge.service import ServiceSetupError

# What the patches were written and tested against. 3.0.3 differs from 3.0.4 only outside what
# they touch (pydicom's UID dictionary, presentation.py, type comments in transport.py: read in
# pynetdicom's git history); the test suite runs on 3.0.4. A new release is added here once the
# DICOM tests (tests/edge/test_dicom_ingest.py, test_bad_input.py, test_dimse_memory.py,
# tests/fuzz/) pass on it.
KNOWN_PYNETDICOM_VERSIONS = frozenset({"3.0.3", "3.0.4"})

_lock = threading.Lock()
_installed = False


def check_version(version: str | None = None) -> None:
    """Refuse a pynetdicom the patches were not written for (``version``: the installed one)."""
    found = pynetdicom.__version__ if version is None else version
    if found not in KNOWN_PYNETDICOM_VERSIONS:
        known = ", ".join(sorted(KNOWN_PYNETDICOM_VERSIONS))
        raise ServiceSetupError(
            f"pynetdicom {found} is installed, but the node's patches to its internals are written "
            f"for pynetdicom {known} (see edge/dicom/patches.py); install one of those "
            "(pip install 'pynetdicom==3.0.4')")


def installed() -> bool:
    """Whether :func:`install` has run in this process."""
    return _installed


def install() -> None:
    """Check pynetdicom's version, then put every patch in (once per process).

    Raises
    ------
    ServiceSetupError
        pynetdicom is a version the patches were not written for; nothing is installed.
    """
    global _installed
    check_version()
    with _lock:
        if _installed:
            return
        # Imported here: these modules hold pynetdicom's originals, taken at their import.
        from edge.dicom import assembly, find_responses, peer_log, receive_file

        # Stream received datasets to disk; keep identifiers and per-PDU debug handlers out of logs.
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        _config.LOG_HANDLER_LEVEL = "none"  # they cost on every C-FIND answer and P-DATA
        # pynetdicom deep-copies the AE's presentation contexts for every association: with every
        # storage SOP class times every transfer syntax that is thousands of UIDs, each re-validated
        # on copy (~100 ms per association on the clinic box). UIDs are immutable strings, so a copy
        # may be the same object.
        UID.__deepcopy__ = _same_uid  # type: ignore[attr-defined]  # str has no __deepcopy__ of its own
        receive_file.install()  # a disk that fills mid-transfer gets 0xA700, not an abort
        assembly.install()  # a message whose fragments never end is aborted, not held in memory
        find_responses.install()  # a 500-item worklist answer without 500 rebuilt command sets
        peer_log.install()  # one line per event per peer from pynetdicom's and pydicom's loggers
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        # pydicom says a malformed value (a peer's UID) twice: on its logger, budgeted per connection in
        # edge.dicom.peer_log, and as a UserWarning on stderr, unbudgeted and with the peer's bytes.
        warnings.filterwarnings("ignore", message=r".*(Invalid value for VR|allowed for VR)", category=UserWarning)
        _installed = True


def _same_uid(self: UID, memo: object) -> UID:
    """A UID's deep copy: the UID itself (immutable)."""
    return self
