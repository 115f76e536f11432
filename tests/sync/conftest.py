"""The regional cloud PACS for the sync tests: a real Orthanc with DICOMweb, one per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers.orthanc import OrthancPeer, start_orthanc


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancPeer]:
    peer = start_orthanc(tmp_path)
    yield peer
    peer.kill()  # nothing to keep: quicker than a clean shutdown
