"""Shared fixtures: a real node process, real DCMTK tools, synthetic images."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import edge.node.parts  # noqa: F401  (the node's registry tells the store every part's tables, for open_database)
from tests.node import (  # noqa: F401 - the helpers the tests import from here since before tests/node.py
    CHROMIUM,
    CHROMIUM_ARGS,
    DCMTK,
    REPO,
    EdgeNode,
    edge_cli,
    free_port,
    unique_node_id,
    wait_for_port,
    write_config,
)


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Any]:
    """Make nodes with section overrides; every one is stopped at the end."""
    nodes: list[EdgeNode] = []

    def make(command: tuple[str, ...] = ("serve", "dicom"), subdir: str = "node", **sections: dict[str, Any]) -> EdgeNode:
        where = tmp_path / subdir
        where.mkdir(exist_ok=True)
        node = EdgeNode(where, command, **sections)
        nodes.append(node)
        return node

    def another_service(node: EdgeNode, command: tuple[str, ...]) -> EdgeNode:
        """A second process of the same node (same edge.toml and data), e.g. ``serve sync``."""
        other = EdgeNode.__new__(EdgeNode)
        other.__dict__.update(node.__dict__)
        other.command, other.proc = command, None
        nodes.append(other)
        return other

    make.another_service = another_service  # type: ignore[attr-defined]
    yield make
    for node in nodes:
        node.kill()


@pytest.fixture
def node(node_factory: Any) -> EdgeNode:
    """A started node with only the DICOM service."""
    return node_factory().start()


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    os.environ.setdefault("EDGE_TEST", "1")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Debian Chromium driven by Playwright (no downloaded browser).

    Per module, not per session: Playwright's sync API runs an event loop in this thread
    while it is open, and the other modules' ``asyncio.run`` must find none."""
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (scripts/test.sh installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def boxes() -> Iterator[Any]:
    """Software ECG boxes (``edge ecg-sim --pty``) for whole-node tests; switched off at the end."""
    from tests.software_box import SoftwareBoxes

    plugged = SoftwareBoxes()
    try:
        yield plugged
    finally:
        plugged.close()


# Whole-tree checks that keep one worker busy for a minute or more (mypy; every module imported
# alone): collected last by name, they would end a parallel run (pytest -n) with the other workers
# idle, so they go first. Only the order changes.
_LONG_FIRST = ("tests/test_types.py", "tests/test_layers.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return _LONG_FIRST.index(path) if path in _LONG_FIRST else len(_LONG_FIRST)

    items.sort(key=rank)  # stable: every other test keeps its place
