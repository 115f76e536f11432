"""Kiosk fixtures: a real `edge serve kiosk` process, a private CUPS, headless Chromium, and
studies with the reader's report stored the way the sync issue's report puller stores them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CHROMIUM, CHROMIUM_ARGS  # noqa: F401 - used by the tests here
from tests.kiosk.cups_peer import CupsPeer, cups_available, private_cups
from tests.kiosk.node import KioskNode, issue, seed_study  # noqa: F401 - the tests import them from here


@pytest.fixture
def kiosk_factory(tmp_path: Path) -> Iterator[Any]:
    nodes: list[KioskNode] = []

    def make(subdir: str = "node", clinic_name: str = "Ikhaya Clinic", **kiosk: Any) -> KioskNode:
        node = KioskNode(tmp_path / subdir, clinic_name, **kiosk)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop()


@pytest.fixture(scope="session")
def cups() -> Iterator[CupsPeer]:
    """One private cupsd for the session (its root must be traversable by the lp user's filters)."""
    if not cups_available():
        pytest.skip("CUPS and cups-pdf are not installed (scripts/test.sh installs them)")
    with private_cups() as peer:
        yield peer
