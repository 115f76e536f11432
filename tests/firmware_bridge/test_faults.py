"""Garbage, CRC errors, dropped frames, a pulled cable: the bridge carries on, nothing kept is lost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from firmware_bridge.boxes import box_summaries, recordings
from firmware_bridge.recording import PADDING
from tests.firmware_bridge.helpers import kept_dataset, kept_recordings, raw_waveform
from tests.waiting import wait_until


def test_garbage_on_the_line_neither_drops_the_session_nor_damages_recordings(store: Any, bridge: Any, box: Any) -> None:
    sim = box(box_id="ECG-G", record_every=0.5, recordings=3, inject=("garbage",))
    running = bridge()
    sim.start()
    sim.wait()
    session = running.session
    assert session.stats.garbage > 0  # there was garbage, and it was noticed
    assert session.stats.connects == 1  # ... without reopening the port
    kept = kept_recordings("ECG-G")
    assert len(kept) == 3 and not any(r["damaged"] for r in kept)


def test_crc_errors_cost_only_the_hit_block_and_the_recording_is_marked(store: Any, bridge: Any, box: Any) -> None:
    sim = box(box_id="ECG-C", record_every=0.5, recordings=2, inject=("crc",))
    running = bridge()
    sim.start()
    stats = sim.wait()
    assert running.session.stats.crc_errors + running.session.stats.garbage >= 2
    assert running.session.stats.connects == 1
    for row in kept_recordings("ECG-C"):
        assert row["damaged"] and row["missing_samples"] == 25  # one 50 ms block, nothing else
        ds = kept_dataset(store, row["sop_instance_uid"])
        assert "25 samples" in ds.WaveformAnnotationSequence[0].UnformattedTextValue
        raw = raw_waveform(ds)
        sent = stats.sent_samples[row["rec_id"]]
        hit = np.all(raw == PADDING, axis=1)
        assert hit.sum() == 25
        assert np.array_equal(raw[~hit][:, [0, 1]], sent[~hit][:, [0, 1]])  # the rest exactly as sent


def test_dropped_frame_is_flagged_as_a_gap_on_the_recording(store: Any, bridge: Any, box: Any) -> None:
    sim = box(box_id="ECG-D", record_every=0.5, recordings=1, inject=("drop",))
    bridge()
    sim.start()
    stats = sim.wait()
    [row] = kept_recordings("ECG-D")
    assert row["damaged"] and row["missing_samples"] == 25 and row["lost_frames"] == 1
    raw = raw_waveform(kept_dataset(store, row["sop_instance_uid"]))
    gap = np.flatnonzero(np.all(raw == PADDING, axis=1))
    assert len(gap) == 25 and gap[-1] - gap[0] == 24  # one contiguous 50 ms hole, in all 12 leads
    sent = stats.sent_samples[row["rec_id"]]
    assert np.array_equal(raw[gap[-1] + 1 :, 0], sent[gap[-1] + 1 :, 0])


def test_unplug_mid_recording_marks_it_interrupted_and_the_box_carries_on_after_replug(
    store: Any, bridge: Any, box: Any
) -> None:
    sim = box(box_id="ECG-U", record_every=0.5, recordings=2, inject=("disconnect",))
    running = bridge()
    sim.start()
    sim.wait()
    states = [r["state"] for r in reversed(recordings("ECG-U"))]
    assert states == ["interrupted", "kept", "kept"]
    assert running.session.stats.connects >= 2  # the bridge found the box again by itself
    assert not any(r["damaged"] for r in kept_recordings("ECG-U"))
    wait_until(lambda: box_summaries()[0]["connected"], what="box shown connected again")


def test_recording_finished_while_the_bridge_was_down_is_kept_when_it_comes_back(
    store: Any, bridge: Any, box: Any, link: Path
) -> None:
    sim = box(box_id="ECG-N", record_every=0.2, recordings=1).start()
    wait_until(lambda: sim.box.unacknowledged is not None, what="recording done")
    assert kept_recordings("ECG-N") == []  # nobody listening yet: the box holds on to it
    bridge()
    sim.wait()
    [row] = kept_recordings("ECG-N")
    assert row["samples"] == 1000 and not row["damaged"]
