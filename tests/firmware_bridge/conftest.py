"""The bridge against the software box over real ptys: an in-process bridge, a box thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.node.config import EdgeConfig, parse_config
from edge.store.db import database, open_database
from edge.store.spool import KeptInstance, Spool
from firmware_bridge.lines import PtyLine
from firmware_bridge.service import BridgeService
from firmware_bridge.session import BoxSession
from firmware_bridge.simulator import BoxStats, SoftwareBox
from tests.waiting import wait_until


class RunningBridge:
    """BridgeService on its own event loop thread, as ``edge serve bridge`` runs it."""

    def __init__(self, config: EdgeConfig, spool: Spool, service: BridgeService | None = None) -> None:
        """``service``: one built elsewhere (as edge.node.services builds it); else a plain one that records what it kept."""
        self.kept: list[KeptInstance] = []
        self.service = service or BridgeService(config, spool, on_kept=self.kept.append)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="bridge-loop", daemon=True)
        self._started = threading.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.service.start())
        self._started.set()
        self.loop.run_forever()

    def start(self) -> RunningBridge:
        self._thread.start()
        assert self._started.wait(10)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.service.stop(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    @property
    def session(self) -> BoxSession:
        return next(iter(self.service.sessions.values()))


class BoxThread:
    """A software box on a pty it "plugs in" at ``link``, run on a thread."""

    def __init__(self, link: Path, **kwargs: Any) -> None:
        self.line = PtyLine(link)
        kwargs.setdefault("speed", 10.0)
        kwargs.setdefault("seconds", 2.0)
        kwargs.setdefault("keep_samples", True)
        self.box = SoftwareBox(self.line, **kwargs)
        self.stats: BoxStats | None = None
        self._thread = threading.Thread(target=self._run, name="ecg-box", daemon=True)

    def _run(self) -> None:
        self.stats = self.box.run(duration=90)

    def start(self) -> BoxThread:
        self._thread.start()
        return self

    def wait(self, timeout: float = 30.0) -> BoxStats:
        """Until the box has its wanted recordings acknowledged (or fails the test)."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "box still waiting for acknowledgements"
        assert self.stats is not None
        return self.stats

    def stop(self) -> None:
        self.box.stop()
        self._thread.join(5)
        self.line.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Spool]:
    data = tmp_path / "var"
    open_database(data)
    yield Spool(data)
    database.close()


@pytest.fixture
def link(tmp_path: Path) -> Path:
    return tmp_path / "usb-ClinicEdge_ECG-if00"


def bridge_config(tmp_path: Path, port: Path, **bridge: Any) -> EdgeConfig:
    settings = {"ports": [str(port)], "port_glob": "", "reconnect_min_s": 0.1, "reconnect_max_s": 0.5,
                "silence_s": 2.0, **bridge}
    return parse_config({"node": {"id": "test-node", "name": "Test Clinic"},
                         "storage": {"data_dir": str(tmp_path / "var"), "min_free_mb": 0},
                         "bridge": settings}, tmp_path)


@pytest.fixture
def bridge(tmp_path: Path, store: Spool, link: Path) -> Iterator[Callable[..., RunningBridge]]:
    """Start the bridge (watching ``link``) when the test says so; always stopped at the end."""
    running: list[RunningBridge] = []

    def start(**settings: Any) -> RunningBridge:
        b = RunningBridge(bridge_config(tmp_path, link, **settings), store).start()
        running.append(b)
        if link.exists():  # a box is plugged in: let the bridge open it before the box talks
            wait_until(lambda: b.session.stats.connects >= 1, what="bridge opened the port")
        return b

    yield start
    for b in running:
        b.stop()


@pytest.fixture
def box(link: Path) -> Iterator[Callable[..., BoxThread]]:
    """A box plugged in at ``link``; its thread starts on ``.start()``."""
    boxes: list[BoxThread] = []

    def make(**kwargs: Any) -> BoxThread:
        b = BoxThread(link, **kwargs)
        boxes.append(b)
        return b

    yield make
    for b in boxes:
        b.stop()
