"""The shipped alert rules and Grafana dashboard: valid for promtool, and about metrics the node exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]

from tests.conftest import REPO

OPS_DOCS = REPO / "docs" / "ops"
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="needs promtool (Debian package prometheus)")

# What the heartbeat carries (edge.ops.metrics.fleet_registry) plus what the Pushgateway adds.
FLEET_METRICS = {
    "push_time_seconds", "push_failure_time_seconds", "edge_node_info", "edge_node_start_time_seconds",
    "edge_studies", "edge_instances", "edge_instances_bytes", "edge_instance_files_missing", "edge_outbox_instances",
    "edge_outbox_depth", "edge_outbox_oldest_age_seconds", "edge_disk_free_bytes",
    "edge_outbox_last_upload_timestamp_seconds", "edge_health_check_ok", "edge_healthy", "edge_service_up",
    # The bridge's (firmware_bridge.metrics, declared in its Part's fleet_collectors).
    "edge_ecg_boxes_connected", "edge_ecg_box_battery_percent", "edge_ecg_box_lead_off", "edge_ecg_recordings",
    # The kiosk's (kiosk.printer_state.PrinterCollector): the printer's probe with its cause.
    "edge_kiosk_printer_ready",
}
_METRIC = re.compile(r"\b((?:edge|push)_[a-z_]+)\b")


def _promtool(*args: str, cwd: Path = OPS_DOCS) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, check=False, text=True, cwd=cwd, timeout=60)


def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    check = _promtool("check", "rules", "alerts.yml")
    assert check.returncode == 0, check.stdout + check.stderr
    tested = _promtool("test", "rules", "alerts_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_alerts_cover_silence_backlog_quarantine_disk_and_cloud() -> None:
    rules = yaml.safe_load((OPS_DOCS / "alerts.yml").read_text())["groups"][0]["rules"]
    exprs = {r["alert"]: r["expr"] for r in rules}
    assert "push_time_seconds" in exprs["EdgeNodeStoppedPushing"]
    assert "edge_outbox_oldest_age_seconds" in exprs["EdgeOutboxOldestAgeHigh"]
    assert 'state="quarantined"' in exprs["EdgeQuarantined"]
    assert "edge_disk_free_bytes" in exprs["EdgeDiskLow"]
    assert 'check="cloud"' in exprs["EdgeCloudFailing"]
    assert "edge_ecg_box_battery_percent" in exprs["EdgeEcgBoxBatteryLow"]
    assert 'state="failed"' in exprs["EdgeEcgRecordingsFailing"]
    for expr in exprs.values():
        assert set(_METRIC.findall(expr)) <= FLEET_METRICS, expr


def test_the_ecg_alerts_have_promtool_unit_tests() -> None:
    tests = yaml.safe_load((OPS_DOCS / "alerts_test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    for alert in ("EdgeEcgBoxBatteryLow", "EdgeEcgRecordingsFailing", "EdgeKioskPrinterDown"):
        assert any(c["alertname"] == alert and c["exp_alerts"] for c in cases), f"{alert}: no test where it fires"


def test_dashboard_queries_are_valid_promql_on_fleet_metrics(tmp_path: Path) -> None:
    dashboard = json.loads((OPS_DOCS / "grafana-fleet.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    for expr in exprs:
        assert set(_METRIC.findall(expr)) <= FLEET_METRICS, expr
    # promtool parses PromQL in recording rules: one rule per panel query, Grafana variables filled in.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e.replace("$node", ".*")} for i, e in enumerate(exprs)
    ]}]}
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump(rules))
    check = _promtool("check", "rules", "dashboard_rules.yml", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
