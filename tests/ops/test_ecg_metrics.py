"""Central ops sees the clinic's ECG boxes: /metrics, the heartbeat (Pushgateway) and the textfile.

Real nodes, real software boxes: ``edge ecg-sim --pty`` plays each box behind the serial
port the bridge watches (one with every electrode on, one with V3 off; both report a
battery of 87 %). The figures are read from the store, so a console or ops process that
is not the bridge reports the same boxes.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from edge.node.config import parse_config
from edge.ops.metrics import fleet_registry
from edge.store.db import database, open_database
from edge.store.models import utcnow
from tests.conftest import EdgeNode
from tests.peers.pushgateway import PUSHGATEWAY, Pushgateway
from tests.software_box import SoftwareBoxes
from tests.waiting import wait_until

GOOD_BOX, LEAD_OFF_BOX = "ECG-ROOM-1", "ECG-ROOM-2"
SIM_BATTERY = 87.0  # what the software box's STATUS reports
NO_RECORDINGS = {"receiving": 0.0, "kept": 0.0, "interrupted": 0.0, "failed": 0.0}
QUIET = {"sync": {"enabled": False}, "reports": {"enabled": False}}


def wait_for(read: Callable[[], Any], expected: Any, what: str, timeout: float = 20.0) -> None:
    """Until ``read()`` gives ``expected``; the failure shows what it gave last."""
    seen: list[Any] = [None]

    def gives_expected() -> bool:
        seen[0] = read()
        return bool(seen[0] == expected)

    wait_until(gives_expected, timeout, what, every=0.2, detail=lambda: f" got  {seen[0]!r}\n want {expected!r}")


def ecg_figures(samples: Iterable[Sample]) -> dict[str, Any]:
    """The bridge's figures, by box and state; other metrics (and labels the Pushgateway adds) left out."""
    found: dict[str, Any] = {"connected": None, "battery": {}, "lead_off": {}, "recordings": {}}
    for s in samples:
        if s.name == "edge_ecg_boxes_connected":
            found["connected"] = s.value
        elif s.name == "edge_ecg_box_battery_percent":
            found["battery"][s.labels["box_id"]] = s.value
        elif s.name == "edge_ecg_box_lead_off":
            found["lead_off"][s.labels["box_id"]] = s.value
        elif s.name == "edge_ecg_recordings":
            found["recordings"][s.labels["state"]] = s.value
    return found


def parse(text: str) -> dict[str, Any]:
    return ecg_figures(s for family in text_string_to_metric_families(text) for s in family.samples)


def scrape(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return parse(resp.read().decode())


def textfile(path: Path) -> dict[str, Any]:
    return parse(path.read_text()) if path.exists() else {}


@pytest.fixture
def pushgateway(tmp_path: Path) -> Iterator[Pushgateway]:
    if not PUSHGATEWAY.exists():
        pytest.skip("needs prometheus-pushgateway")
    gateway = Pushgateway(tmp_path / "pushgateway").start()
    yield gateway
    gateway.stop()


def test_edge_run_reports_its_ecg_boxes_and_recordings_on_metrics_and_in_the_heartbeat(
    node_factory: Any, boxes: SoftwareBoxes, pushgateway: Pushgateway, tmp_path: Path
) -> None:
    good_link = tmp_path / "usb-ClinicEdge_ECG8_ROOM1-if00"
    lead_off_link = tmp_path / "usb-ClinicEdge_ECG8_ROOM2-if00"
    prom = tmp_path / "textfile" / "clinic_edge.prom"
    node = node_factory(
        ("run",), **QUIET,
        bridge={"ports": [str(good_link), str(lead_off_link)], "port_glob": "",
                "reconnect_min_s": 0.2, "reconnect_max_s": 0.5},
        ops={"zeroconf": False, "pushgateway_url": pushgateway.url, "push_interval_s": 1.0,
             "textfile_dir": str(prom.parent)},
    ).start()

    # No box yet: the figures are there, at zero, for every recording state.
    nothing = {"connected": 0.0, "battery": {}, "lead_off": {}, "recordings": NO_RECORDINGS}
    assert scrape(node.console_port) == nothing

    # Both boxes switched on, neither recording: connected, battery, one with V3 off.
    good = boxes.plug_in(good_link, GOOD_BOX, "--record-every", "0")
    boxes.plug_in(lead_off_link, LEAD_OFF_BOX, "--record-every", "0", "--inject", "lead-off")
    both = {
        "connected": 2.0, "battery": {GOOD_BOX: SIM_BATTERY, LEAD_OFF_BOX: SIM_BATTERY},
        "lead_off": {GOOD_BOX: 0.0, LEAD_OFF_BOX: 1.0}, "recordings": NO_RECORDINGS,
    }
    wait_for(lambda: scrape(node.console_port), both, "both boxes on /metrics")
    # The same figures reach central ops: the Pushgateway group and the node_exporter textfile.
    wait_for(lambda: ecg_figures(pushgateway.samples("test-node")), both, "both boxes in the Pushgateway")
    wait_for(lambda: textfile(prom), both, "both boxes in the textfile")

    # The good box records one ECG and is switched off once the node has acknowledged it.
    boxes.unplug(good)
    recorder = boxes.plug_in(good_link, GOOD_BOX, "--record-every", "1", "--seconds", "4", "--speed", "2",
                             "--recordings", "1")
    out, err = recorder.communicate(timeout=40)
    assert recorder.returncode == 0, err
    assert json.loads(out)["recordings_acked"] == 1

    # One recording kept; the box that went away drops out of battery and lead-off.
    after = {
        "connected": 1.0, "battery": {LEAD_OFF_BOX: SIM_BATTERY}, "lead_off": {LEAD_OFF_BOX: 1.0},
        "recordings": {**NO_RECORDINGS, "kept": 1.0},
    }
    wait_for(lambda: scrape(node.console_port), after, "the kept recording on /metrics")
    wait_for(lambda: ecg_figures(pushgateway.samples("test-node")), after, "the kept recording in the Pushgateway")
    wait_for(lambda: textfile(prom), after, "the kept recording in the textfile")
    assert pushgateway.value("edge_ecg_recordings", "test-node", state="kept", job="clinic_edge") == 1.0


def _serve(node: EdgeNode, service: str, ready: str) -> None:
    """One service as its own process (as under systemd), ready once its log says so."""
    node.command = ("serve", service)
    node._log_offset = node.log.stat().st_size if node.log.exists() else 0
    with open(node.log, "ab") as log:
        node.proc = subprocess.Popen([sys.executable, "-m", "edge", "--config", str(node.config), *node.command],
                                     stdout=log, stderr=subprocess.STDOUT, cwd=node.tmp)
    node.wait_for_log(ready)


def test_console_and_ops_processes_report_the_box_the_bridge_process_sees(
    node_factory: Any, boxes: SoftwareBoxes, tmp_path: Path
) -> None:
    link = tmp_path / "usb-ClinicEdge_ECG8_ROOM2-if00"
    prom = tmp_path / "textfile" / "clinic_edge.prom"
    bridge = node_factory(
        ("serve", "bridge"), **QUIET,
        bridge={"ports": [str(link)], "port_glob": "", "reconnect_min_s": 0.2, "reconnect_max_s": 0.5},
        ops={"zeroconf": False, "push_interval_s": 1.0, "textfile_dir": str(prom.parent)},
    )
    _serve(bridge, "bridge", "bridge: watching 1 port(s)")
    console = node_factory.another_service(bridge, ("serve", "console"))
    _serve(console, "console", "console: listening on")
    ops = node_factory.another_service(bridge, ("serve", "ops"))
    _serve(ops, "ops", "textfile: writing")

    boxes.plug_in(link, LEAD_OFF_BOX, "--record-every", "0", "--inject", "lead-off")
    seen = {"connected": 1.0, "battery": {LEAD_OFF_BOX: SIM_BATTERY}, "lead_off": {LEAD_OFF_BOX: 1.0},
            "recordings": NO_RECORDINGS}
    wait_for(lambda: scrape(bridge.console_port), seen, "the box on edge serve console's /metrics")
    wait_for(lambda: textfile(prom), seen, "the box in edge serve ops' textfile")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Any]:
    config = parse_config({"node": {"id": "test-node"}, "storage": {"data_dir": str(tmp_path / "var")}}, tmp_path)
    open_database(config.data_dir)
    yield config
    database.close()


def test_a_box_the_bridge_has_not_heard_from_lately_is_not_connected_and_every_state_is_counted(store: Any) -> None:
    from firmware_bridge import boxes
    from firmware_bridge.protocol import Hello, Status
    from firmware_bridge.tables import Box

    for box_id, port, lead_off in ((GOOD_BOX, "/dev/ttyUSB0", 0), (LEAD_OFF_BOX, "/dev/ttyUSB1", 0b11)):
        boxes.note_hello(port, Hello(box_id, "ECG8", "1.0.0", 500, 1000))
        boxes.note_status(box_id, Status(12, 0, lead_off), recording=False)
    boxes.note_hello("/dev/ttyUSB2", Hello("ECG-NEW", "ECG8", "1.0.0", 500, 1000))  # no STATUS yet: no battery
    # The bridge was killed while GOOD_BOX was plugged in: its row still says connected, but stale.
    stale = utcnow() - dt.timedelta(seconds=boxes.CONNECTED_FRESH_S + 5)
    Box.update(last_seen=stale).where(Box.box_id == GOOD_BOX).execute()
    for rec_id, state in enumerate(("kept", "kept", "failed", "interrupted", "receiving"), start=1):
        boxes.recording_started(LEAD_OFF_BOX, rec_id)
        if state != "receiving":
            boxes.recording_finished(LEAD_OFF_BOX, rec_id, state)

    figures = parse(generate_latest(fleet_registry(store)).decode())
    assert figures == {
        "connected": 2.0, "battery": {LEAD_OFF_BOX: 12.0}, "lead_off": {LEAD_OFF_BOX: 1.0, "ECG-NEW": 0.0},
        "recordings": {"receiving": 1.0, "kept": 2.0, "interrupted": 1.0, "failed": 1.0},
    }
    assert [b["box_id"] for b in boxes.box_summaries() if b["connected"]] == ["ECG-NEW", LEAD_OFF_BOX]  # edge status agrees


def test_importing_the_bridge_metrics_stays_cheap() -> None:
    """edge serve console / ops import it: no pyserial, numpy or the bridge's protocol modules."""
    code = ("import sys, firmware_bridge.metrics; "
            "print(sorted(m for m in ('serial', 'serial_asyncio', 'numpy', 'cobs', 'firmware_bridge.protocol', "
            "'firmware_bridge.session') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"
