"""A power cut at any instant loses nothing the DR was told Success for (load-shedding).

storescu sends a series; the node is SIGKILLed at a seeded random moment mid-transfer;
after restart every instance the DR saw acknowledged is listed, byte-identical in the
spool, queued exactly once, and no temp file of the cut transfer is left.
"""

from __future__ import annotations

import random
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from tests.conftest import DCMTK
from tests.dicom_factory import make_dx
from tests.edge.helpers import echo_succeeds, outbox_rows_for, query, spool_files, temp_files
from tests.edge.test_dicom_ingest import dataset_bytes

SERIES_SIZE = 30
STUDY_UID = "1.2.826.0.1.3680043.8.498.77"


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, str]:
    """30 DX images of ~2 MB each (1024 x 1024 x 16 bit): file -> SOP Instance UID."""
    folder = tmp_path_factory.mktemp("series")
    series_uid = generate_uid()
    files = {}
    for i in range(SERIES_SIZE):
        path = folder / f"img{i:02d}.dcm"
        ds = make_dx(path, rows=1024, cols=1024, study_uid=STUDY_UID, series_uid=series_uid, accession="CUT", seed=i)
        files[path] = str(ds.SOPInstanceUID)
    return files


def acknowledged_files(storescu_output: str) -> list[Path]:
    """Files storescu -v reports as sent and answered Success, in order."""
    acked, current = [], None
    for line in storescu_output.splitlines():
        if line.startswith("I: Sending file: "):
            current = Path(line.removeprefix("I: Sending file: ").strip())
        elif "Received Store Response (Success)" in line and current is not None:
            acked.append(current)
            current = None
    return acked


def store_and_cut(argv: list[str], after_acks: int | None, cut: Callable[[], None], wait_s: float = 30.0) -> list[Path]:
    """Run ``storescu -v`` (``argv``); after ``after_acks`` Success responses call ``cut`` (the
    power goes) and stop sending; the files storescu saw acknowledged, in order."""
    sender = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    assert sender.stdout is not None
    output: list[str] = []
    acks = 0
    for line in sender.stdout:
        output.append(line)
        if after_acks is not None and "Received Store Response (Success)" in line:
            acks += 1
            if acks == after_acks:
                cut()
                break
    output += sender.stdout.readlines()
    sender.wait(wait_s)
    return acknowledged_files("".join(output))


# (seed, acknowledgements to wait for before the cut): early, middle and late in the series.
KILL_POINTS = [(1101, 1), (2202, 9), (3303, 17), (4404, 26)]


@pytest.mark.slow
@pytest.mark.parametrize("seed,after_acks", KILL_POINTS, ids=[f"seed{s}-after{n}" for s, n in KILL_POINTS])
def test_acknowledged_instances_survive_a_power_cut(
    node_factory: Any, series: dict[Path, str], seed: int, after_acks: int
) -> None:
    rng = random.Random(seed)
    delay = rng.uniform(0.0, 0.06)  # then cut: anywhere inside the next instance's transfer
    print(f"power cut: seed {seed}, after {after_acks} acknowledgements + {delay * 1000:.1f} ms")
    node = node_factory().start()
    files = sorted(series)

    def cut() -> None:
        time.sleep(delay)
        node.kill()  # SIGKILL: no clean-up runs, as in a power cut

    argv = [str(DCMTK / "storescu"), "-v", "-aet", "DR1", "-aec", node.ae_title, "127.0.0.1", str(node.port), *map(str, files)]
    acked = store_and_cut(argv, after_acks, cut)
    assert node.proc is not None and node.proc.returncode == -9, "the node was not cut mid-transfer"
    assert len(acked) >= after_acks
    assert len(acked) < SERIES_SIZE, "the whole series went through before the cut"

    node.start()
    assert echo_succeeds(node)
    studies = node.studies()
    assert [s["study_instance_uid"] for s in studies] == [STUDY_UID]
    assert studies[0]["instances"] >= len(acked)
    assert studies[0]["sync_state"] == "pending"
    for path in acked:
        sop = series[path]
        kept = node.data_dir / "spool" / STUDY_UID / f"{sop}.dcm"
        assert kept.exists(), f"acknowledged instance {path.name} lost in the power cut"
        assert dataset_bytes(kept) == dataset_bytes(path), f"{path.name} differs from what the DR sent"
        assert outbox_rows_for(node, sop) == 1

    # Nothing half-kept: every file in the spool is a whole instance with its rows, and the
    # temp file of the transfer that was cut is gone.
    by_sop = {sop: path for path, sop in series.items()}
    kept_files = spool_files(node)
    assert len(kept_files) == studies[0]["instances"]
    for kept in kept_files:
        assert dataset_bytes(kept) == dataset_bytes(by_sop[kept.stem])
        assert outbox_rows_for(node, kept.stem) == 1
    assert query(node, "select count(*) from outbox") == [(len(kept_files),)]
    assert temp_files(node) == []
    assert node.status()["store"]["files_missing"] == 0
