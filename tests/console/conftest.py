"""Console fixtures: a real node (``edge run``) with an admin and a technician, and headless Chromium."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import EdgeNode
from tests.console.helpers import add_user

from tests.conftest import CHROMIUM, CHROMIUM_ARGS  # noqa: F401 - used by the tests here
TECH, TECH_PASSWORD = "thandi", "xray-room-1"
ADMIN, ADMIN_PASSWORD = "admin", "admin-pass-1"

# Services a console test needs; no sync unless a test brings a cloud, no ECG ports.
QUIET = {"sync": {"enabled": False}, "bridge": {"enabled": False, "port_glob": ""}, "reports": {"enabled": False}}


def console_node(node_factory: Any, **sections: dict[str, Any]) -> EdgeNode:
    """A started ``edge run`` node with an admin and a technician account."""
    merged = {**QUIET, **sections}
    merged["node"] = {"id": "clinic-0042", "name": "Ikhaya Clinic", **merged.get("node", {})}
    merged["dicom"] = {"modality_ae": "DR", "modality_host": "127.0.0.1", **merged.get("dicom", {})}  # findscu's DR
    merged["console"] = {"exams": ["Knee X-ray"], **merged.get("console", {})}
    merged["kiosk"] = {"bind_address": "127.0.0.1", **merged.get("kiosk", {})}
    node: EdgeNode = node_factory(("run",), **merged)
    add_user(node, ADMIN, ADMIN_PASSWORD, "admin")
    add_user(node, TECH, TECH_PASSWORD)
    return node.start()


@pytest.fixture
def cnode(node_factory: Any) -> EdgeNode:
    return console_node(node_factory)


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh Chromium tab (own cookies) on the module's browser."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(15000)
    expect.set_options(timeout=15000)
    yield tab
    context.close()


def log_in(page: Any, node: EdgeNode, user: str, password: str) -> None:
    """What a technician does at the clinic PC: open the console, get the login page, sign in."""
    page.goto(f"http://127.0.0.1:{node.console_port}/")
    assert page.url.endswith("/login")  # not logged in: the console sends you to the login page
    page.fill("#user", user)
    page.fill("#password", password)
    page.click("#login")
