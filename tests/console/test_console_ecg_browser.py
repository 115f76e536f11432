"""The technician's ECG in real headless Chromium: see the boxes, arm one for a patient, get the ECG on the visit.

The node is a real ``edge run`` whose bridge watches two serial ports; ``edge ecg-sim
--pty`` plays the boxes behind them: one with every electrode on, one with V3 off. The
technician registers an ECG visit, sees both boxes (battery, electrodes) on the Today
page, arms the good box for the patient, and the box's next recording arrives as that
order's ECG: the visit moves to "Images received" on the open page, the kept DICOM
carries the order's patient id and accession number, and the box is no longer armed.

The software box has no button to press on demand (``--record-every`` presses it on a
timer from start-up), so "press record" is the box switched on again with the button
pressed: that way no recording can come before the arming, on any machine speed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from playwright.sync_api import expect
from pydicom import dcmread

from tests.console.conftest import TECH, TECH_PASSWORD, console_node, log_in
from tests.edge.helpers import query
from tests.software_box import SoftwareBoxes

GOOD_BOX, LEAD_OFF_BOX = "ECG-ROOM-1", "ECG-ROOM-2"
ID_NUMBER = "9203150123082"  # a valid SA ID number (Luhn check digit)
ARMED_MESSAGE = "The ECG box is ready: its next recording belongs to that patient."


def test_technician_arms_an_ecg_box_and_the_recording_lands_on_the_patients_visit(
    node_factory: Any, boxes: SoftwareBoxes, page: Any, tmp_path: Path
) -> None:
    good_link = tmp_path / "usb-ClinicEdge_ECG8_ROOM1-if00"
    lead_off_link = tmp_path / "usb-ClinicEdge_ECG8_ROOM2-if00"
    node = console_node(
        node_factory,
        bridge={"enabled": True, "ports": [str(good_link), str(lead_off_link)], "port_glob": "",
                "reconnect_min_s": 0.2, "reconnect_max_s": 0.5},
        console={"refresh_s": 1.0},
    )
    # Both boxes switched on; neither presses record.
    good = boxes.plug_in(good_link, GOOD_BOX, "--record-every", "0")
    boxes.plug_in(lead_off_link, LEAD_OFF_BOX, "--record-every", "0", "--inject", "lead-off")

    log_in(page, node, TECH, TECH_PASSWORD)
    page.wait_for_selector("text=Today’s visits")
    page.click("text=+ Register patient")
    page.fill("#surname", "Molefe")
    page.fill("#given_names", "Lerato")
    page.check("input[name=sex][value=F]")
    page.fill("#id_number", ID_NUMBER)
    page.check("input[name=exam][value=ECG]")
    page.click("#register")
    page.wait_for_selector("#accession")
    accession = page.inner_text("#accession")
    assert accession.startswith("CLINC0042-")
    assert "Arm an ECG box for this patient" in page.inner_text("body")
    page.click("text=Back to today")

    row = page.locator("tr[data-order]", has_text=accession)
    expect(row).to_have_attribute("data-state", "waiting")
    order_id = row.get_attribute("data-order")

    # The ECG panel: each box with its battery and electrodes, as the boxes' STATUS says.
    good_item = page.locator(f'#ecg li[data-box="{GOOD_BOX}"]')
    lead_off_item = page.locator(f'#ecg li[data-box="{LEAD_OFF_BOX}"]')
    expect(good_item).to_contain_text(f"{GOOD_BOX} connected · battery 87% · Electrodes on")
    expect(lead_off_item).to_contain_text(f"{LEAD_OFF_BOX} connected · battery 87%")
    expect(lead_off_item.locator(".problem")).to_have_text("Electrode off: V3")
    expect(good_item.locator(".problem")).to_have_count(0)
    expect(page.locator("#ecg em", has_text="armed")).to_have_count(0)

    # Arm the good box for this patient.
    good_item.locator("select[name=order]").select_option(order_id)
    good_item.locator("button", has_text="Arm box").click()
    expect(page.locator(".notice", has_text=ARMED_MESSAGE)).to_be_visible()
    expect(good_item.locator("em")).to_have_text("armed")
    expect(lead_off_item.locator("em")).to_have_count(0)
    assert query(node, "SELECT action, user FROM order_audit WHERE action = 'arm_box'") == [("arm_box", TECH)]

    # Press record: the box comes back on with its button pressed, records one ECG and
    # exits once the node has acknowledged it.
    boxes.unplug(good, good_link)
    recorder = boxes.plug_in(good_link, GOOD_BOX, "--record-every", "1", "--seconds", "4", "--speed", "2",
                             "--recordings", "1")
    out, err = recorder.communicate(timeout=40)
    assert recorder.returncode == 0, err
    assert json.loads(out)["recordings_acked"] == 1

    # What the technician sees, on the page left open: the ECG is on the patient's visit,
    # the box (switched off again) is no longer armed, nothing waits in "Images without a visit".
    expect(row).to_have_attribute("data-state", "received")
    expect(row.locator("td.state")).to_contain_text("Images received")
    expect(good_item).to_contain_text(f"{GOOD_BOX} not connected · battery 87%")  # rendered after the recording
    expect(good_item).not_to_contain_text("Electrodes on")  # a box that is away cannot vouch for its electrodes
    expect(good_item).not_to_contain_text("armed")
    expect(good_item.locator("em")).to_have_count(0)
    expect(page.locator("#unmatched")).to_have_count(0)
    assert query(node, "SELECT COUNT(*) FROM arming") == [(0,)]

    # What the node kept: one 12-lead ECG, matched, carrying the order's patient and accession.
    [(state, matched, patient_id, rec_accession, lead_off, sop_uid)] = query(
        node, "SELECT state, matched, patient_id, accession_number, lead_off, sop_instance_uid FROM ecg_recording"
        " WHERE box_id = ?", GOOD_BOX)
    assert (state, matched, patient_id, rec_accession, lead_off) == ("kept", 1, ID_NUMBER, accession, "")
    [(path,)] = query(node, "SELECT path FROM instance WHERE sop_instance_uid = ?", sop_uid)
    ds = dcmread(node.data_dir / "spool" / path)
    assert (ds.Modality, ds.PatientID, ds.AccessionNumber) == ("ECG", ID_NUMBER, accession)
    assert str(ds.PatientName).upper() == "MOLEFE^LERATO"
    [study] = [s for s in node.studies() if s["accession_number"] == accession]
    assert "ECG" in study["modalities"]
    assert query(node, "SELECT study_match.order_id, how FROM study_match JOIN study ON study.id = study_match.study_id"
                       " WHERE study.accession_number = ?", accession) == [(int(order_id), "accession")]
    assert not re.search(r"Molefe|MOLEFE", node.log_text())  # no patient names in the log
