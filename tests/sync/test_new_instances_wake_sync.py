"""An instance kept in one process starts its upload at once in another (edge.outbox_bell).

Under `edge run` the DICOM service and the sync service are separate children; under
systemd they are separate units. With the worker's poll set to ten minutes here, only the
bell can explain an upload that starts within seconds of the C-STORE.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EdgeNode
from tests.dicom_factory import make_dx
from tests.peers.orthanc import OrthancPeer

SLOW_POLL = {"poll_interval_s": 600.0, "retry_min_s": 0.2, "retry_max_s": 1.0, "compress": "none"}
PROMPT_S = 30.0  # generous on a busy box; the poll alone would take 600 s


def synced_within(node: EdgeNode, seconds: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        studies = node.studies()
        if studies and all(s["sync_state"] == "synced" for s in studies):
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"not synced within {seconds}s: {node.studies()}\n{node.log_text()[-2000:]}")


@pytest.mark.parametrize("layout", ["edge run", "systemd units"])
def test_an_instance_kept_by_the_dicom_process_is_uploaded_at_once(
    node_factory: Any, orthanc: OrthancPeer, tmp_path: Path, layout: str
) -> None:
    sections = {"cloud": {"dicomweb_url": orthanc.dicomweb_url}, "sync": SLOW_POLL, "reports": {"enabled": False}}
    if layout == "edge run":
        node = node_factory(("run",), **sections).start()
    else:
        node = node_factory(("serve", "dicom"), **sections).start()
        node_factory.another_service(node, ("serve", "sync")).start()
    uids = []
    # The first may be found by the worker's first look at start-up; the second, sent once the
    # worker has gone idle on its ten-minute poll, only by the bell.
    for n in range(2):
        image = tmp_path / f"chest{n}.dcm"
        uids.append(str(make_dx(image, seed=n, accession=f"ACC{n}").SOPInstanceUID))
        result = node.storescu(image)
        assert result.returncode == 0 and "Received Store Response (Success)" in result.stderr, result.stderr[-500:]
        synced_within(node, PROMPT_S)
    assert sorted(orthanc.sop_instance_uids()) == sorted(uids)
