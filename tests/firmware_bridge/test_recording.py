"""A button press on the box becomes a DICOM 12-lead ECG in the node's store, queued first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge.store.const import PRIORITY_ECG
from firmware_bridge.boxes import arm_box, box_summaries
from firmware_bridge.const import TWELVE_LEAD_ECG_SOP_CLASS
from tests.firmware_bridge.helpers import (
    LEADS,
    kept_dataset,
    kept_recordings,
    outbox_of,
)
from tests.waiting import wait_until


def test_recording_arrives_as_a_12_lead_ecg_within_one_lsb_of_what_the_box_sent(store: Any, bridge: Any, box: Any) -> None:
    sim = box(box_id="ECG-0001", record_every=1.0, recordings=1)
    running = bridge()
    sim.start()
    stats = sim.wait()
    rec_id = stats.recordings_acked[0]
    sent = stats.sent_samples[rec_id].astype(float) * 2.5  # µV, as the box meant them

    [row] = kept_recordings("ECG-0001")
    assert row["rec_id"] == rec_id and not row["damaged"] and row["missing_samples"] == 0
    ds = kept_dataset(store, row["sop_instance_uid"])
    assert ds.SOPClassUID == TWELVE_LEAD_ECG_SOP_CLASS and ds.Modality == "ECG"
    group = ds.WaveformSequence[0]
    assert float(group.SamplingFrequency) == 500 and group.WaveformSampleInterpretation == "SS"
    codes = [(ch.ChannelSourceSequence[0].CodingSchemeDesignator, ch.ChannelSourceSequence[0].CodeMeaning)
             for ch in group.ChannelDefinitionSequence]
    assert [scheme for scheme, _ in codes] == ["SCPECG"] * 12
    assert [meaning.split()[1] for _, meaning in codes] == list(LEADS)
    for ch in group.ChannelDefinitionSequence:
        assert ch.ChannelSensitivityUnitsSequence[0].CodeValue == "uV"
        assert float(ch.ChannelSensitivity) == 2.5

    uv = ds.waveform_array(0)  # what a viewer draws, in µV
    assert uv.shape == (1000, 12)
    col = {lead: uv[:, i] for i, lead in enumerate(LEADS)}
    for i, lead in enumerate(("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")):
        assert np.abs(col[lead] - sent[:, i]).max() <= 2.5, lead
    lead_i, lead_ii = sent[:, 0], sent[:, 1]
    assert np.abs(col["III"] - (lead_ii - lead_i)).max() <= 2.5
    assert np.abs(col["aVR"] + (lead_i + lead_ii) / 2).max() <= 2.5
    assert np.abs(col["aVL"] - (lead_i - lead_ii / 2)).max() <= 2.5
    assert np.abs(col["aVF"] - (lead_ii - lead_i / 2)).max() <= 2.5
    assert 500 < np.ptp(col["II"]) < 3000  # a QRS of a millivolt or so: drawn right on mm paper

    outbox = outbox_of(row["sop_instance_uid"])
    assert outbox.state == "pending" and outbox.priority == PRIORITY_ECG
    assert [k.sop_instance_uid for k in running.kept] == [row["sop_instance_uid"]]  # sync is woken

    [summary] = box_summaries()
    assert summary["box_id"] == "ECG-0001" and summary["firmware"] == "1.0.0" and summary["battery_pct"] == 87


def test_armed_box_links_patient_and_order_then_next_is_unmatched(store: Any, bridge: Any, box: Any) -> None:
    sim = box(box_id="ECG-0002", record_every=1.0, recordings=2)
    running = bridge()
    arm_box("ECG-0002", "PID-77", "DLAMINI^THANDI", "ACC0042")
    sim.start()
    sim.wait()

    first, second = kept_recordings("ECG-0002")
    assert first["matched"] and first["accession_number"] == "ACC0042" and first["patient_id"] == "PID-77"
    ds = kept_dataset(store, first["sop_instance_uid"])
    assert (ds.PatientID, str(ds.PatientName), ds.AccessionNumber) == ("PID-77", "DLAMINI^THANDI", "ACC0042")

    assert not second["matched"]  # the arming was for one recording only
    ds2 = kept_dataset(store, second["sop_instance_uid"])
    assert ds2.PatientID == "" and ds2.AccessionNumber == ""
    assert [k.sop_instance_uid for k in running.kept] == [first["sop_instance_uid"], second["sop_instance_uid"]]
    assert not box_summaries()[0]["armed"]


def test_box_plugged_in_under_the_by_id_folder_is_found_and_lead_off_shown(
    store: Any, bridge: Any, box: Any, tmp_path: Path
) -> None:
    running = bridge(ports=[], port_glob=str(tmp_path / "usb-*-if00"), rescan_s=0.2)
    assert running.service.sessions == {}  # nothing plugged in: the bridge idles
    sim = box(box_id="ECG-LO", record_every=2.0, recordings=1, speed=4.0, inject=("lead-off",)).start()
    wait_until(lambda: box_summaries() and box_summaries()[0]["lead_off"] == ["V3"], what="lead-off in status")
    sim.wait()
    [row] = kept_recordings("ECG-LO")
    assert row["lead_off"] == "V3"
    ds = kept_dataset(store, row["sop_instance_uid"])
    assert "electrode(s) off during recording: V3" in ds.WaveformAnnotationSequence[0].UnformattedTextValue
