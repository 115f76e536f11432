"""The appliance tests: one image built from this commit, one box booted from it.

The image is built once per run by ``image/build.sh`` (as root, from this machine's apt
sources): that build is part of what is tested. ``EDGE_APPLIANCE_IMAGE=path/to.img``
reuses an image already built from the same tree (developers; the .update bundle must
sit beside it). Run alone, test_box.py and test_update.py live on one box, one after the
other; test.sh runs them on two xdist workers, a box each (test_update.py provisions and
first-boots its own), the image built once by whichever worker asks first. Every test here needs root, QEMU, OVMF and ``ip netns``; they are skipped
with the reason when one is missing, and .ci/run installs all of them.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.appliance.box import REPO, Box, BuiltImage, open_box
from tests.appliance.vm import FIGURES, OVMF_CODE
from tests.peers.fault_proxy import FaultProxy
from tests.peers.orthanc import OrthancPeer


def _merge(figures: dict[str, str]) -> None:
    """Both boxes' figures under one key each (two first boots: both shown)."""
    for what, figure in figures.items():
        if what in FIGURES and figure not in FIGURES[what].split(" | "):
            FIGURES[what] = f"{FIGURES[what]} | {figure}"
        else:
            FIGURES.setdefault(what, figure)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """An xdist worker hands its figures to the controller, which prints them all."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["appliance_figures"] = json.dumps(FIGURES)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: absent without xdist
def pytest_testnodedown(node: object, error: object) -> None:
    _merge(json.loads(getattr(node, "workeroutput", {}).get("appliance_figures", "{}")))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("appliance figures")
        for what, figure in FIGURES.items():
            terminalreporter.write_line(f"FIGURE {what}: {figure}")


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mmdebstrap, ip netns)"
    for tool in ("qemu-system-x86_64", "mmdebstrap", "mksquashfs", "mcopy", "sfdisk", "socat", "ip"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if not OVMF_CODE.exists():
        return "needs OVMF (Debian package ovmf)"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    why = _missing()
    if why:
        for item in items:
            if "tests/appliance/" in str(item.fspath):
                item.add_marker(pytest.mark.skip(reason=f"appliance tests: {why}"))


@pytest.fixture(scope="session")
def built_image(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> BuiltImage:
    given = os.environ.get("EDGE_APPLIANCE_IMAGE")
    if given:
        return BuiltImage(Path(given))
    # One build for the run: under xdist the workers share the base temp's parent, and the
    # first to take the lock builds while the other waits for it.
    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    out = shared / "image"
    with open(shared / "image.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        images = sorted(out.glob("clinic-edge-*.img"))
        if not images:
            if out.exists():
                pytest.fail("image/build.sh failed in the other worker: its first test says why")
            out.mkdir()
            images = _build(out)
    assert len(images) == 1, f"expected one image in {out}: {images}"
    built = BuiltImage(images[0])
    assert built.update.exists()
    return built


def _build(out: Path) -> list[Path]:
    started = time.monotonic()
    run = subprocess.run([str(REPO / "image/build.sh"), "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, f"image/build.sh failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    summary = [line for line in run.stdout.splitlines() if line.startswith("build.sh:")]
    print("\n".join(summary), f"(test's clock: {time.monotonic() - started:.0f} s)")
    FIGURES["image/build.sh (test's clock)"] = f"{time.monotonic() - started:.0f} s; " + "; ".join(summary)
    return sorted(out.glob("clinic-edge-*.img"))


@pytest.fixture(scope="session")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OrthancPeer, FaultProxy]]:
    """The regional PACS (Orthanc + DICOMweb) behind a proxy that counts every upload."""
    orthanc = OrthancPeer(tmp_path_factory.mktemp("cloud")).start()
    proxy = FaultProxy(orthanc.base_url).start()
    try:
        yield orthanc, proxy
    finally:
        proxy.stop()
        orthanc.stop()


@pytest.fixture(scope="session")
def box(built_image: BuiltImage, cloud: tuple[OrthancPeer, FaultProxy], tmp_path_factory: pytest.TempPathFactory,
        request: pytest.FixtureRequest) -> Iterator[Box]:
    """This session's box: test_box.py's life then test_update.py's updates on one card, or either alone."""
    orthanc, proxy = cloud
    updates = any(item.path.name == "test_update.py" for item in request.session.items)
    with open_box(built_image, orthanc, proxy, tmp_path_factory.mktemp("box"), updates=updates) as b:
        yield b
