"""Eight leads at 500 Hz fit a 115200 baud line with room to spare, and nothing is lost."""

from __future__ import annotations

import time
from typing import Any

from tests.firmware_bridge.helpers import kept_recordings


def test_a_minute_of_8_leads_at_500hz_over_115200_baud_loses_no_frame(store: Any, bridge: Any, box: Any) -> None:
    # Six back-to-back 10 s recordings (a minute of streaming), 30x faster than real time.
    sim = box(box_id="ECG-T", record_every=0.001, seconds=10.0, recordings=6, speed=30.0, keep_samples=False)
    running = bridge()
    sim.start()
    stats = sim.wait(timeout=40)

    assert stats.overruns == 0  # the box never had more to send than the line could carry
    assert stats.line_utilisation(115200) < 0.80, f"{stats.line_utilisation(115200):.1%} of the line"
    session = running.session.stats
    assert (session.lost_frames, session.crc_errors, session.garbage) == (0, 0, 0)
    deadline = time.monotonic() + 30  # the last one may still be on its way to disk
    while len(kept := kept_recordings("ECG-T")) < 6 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(kept) == 6
    assert all(r["samples"] == 5000 and not r["damaged"] and r["lost_frames"] == 0 for r in kept)
