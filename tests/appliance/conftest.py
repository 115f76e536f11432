"""The appliance tests: one image built from this commit, one box booted from it.

The image is built once per run by ``image/build.sh`` (as root, from this machine's apt
sources): that build is part of what is tested. ``EDGE_APPLIANCE_IMAGE=path/to.img``
reuses an image already built from the same tree (developers; the .update bundle must
sit beside it). Every test here needs root, QEMU, OVMF and ``ip netns``; they are skipped
with the reason when one is missing, and .ci/run installs all of them.
"""

from __future__ import annotations

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
def built_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    given = os.environ.get("EDGE_APPLIANCE_IMAGE")
    if given:
        return BuiltImage(Path(given))
    out = tmp_path_factory.mktemp("image")
    started = time.monotonic()
    run = subprocess.run([str(REPO / "image/build.sh"), "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, f"image/build.sh failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    summary = [line for line in run.stdout.splitlines() if line.startswith("build.sh:")]
    print("\n".join(summary), f"(test's clock: {time.monotonic() - started:.0f} s)")
    FIGURES["image/build.sh (test's clock)"] = f"{time.monotonic() - started:.0f} s; " + "; ".join(summary)
    images = sorted(out.glob("clinic-edge-*.img"))
    assert len(images) == 1, f"expected one image in {out}: {images}"
    built = BuiltImage(images[0])
    assert built.update.exists()
    return built


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
def box(built_image: BuiltImage, cloud: tuple[OrthancPeer, FaultProxy], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    """The one box of the run: test_box.py's life, then test_update.py's updates, on the same card."""
    orthanc, proxy = cloud
    with open_box(built_image, orthanc, proxy, tmp_path_factory.mktemp("box")) as b:
        yield b
