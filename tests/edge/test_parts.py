"""Every package declares itself once (its Part), and the node is put together from those (issue 13).

Before, the node started services through an if/elif ladder on names, migrations and fleet
metrics were lists of module names in strings, and doctor and the CLI named every package
by hand. These tests read the registry the way the node does.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from edge.node.config import EdgeConfig, parse_config
from edge.node.parts import PARTS, PARTS_IN_ORDER, SERVICE_NAMES
from edge.node.services import build_services
from edge.node.supervisor import RUN_GROUPS
from edge.outbox_bell import OutboxBell
from edge.part import DoctorItem, Part, PartOrderError, in_dependency_order
from edge.service import BackgroundTasks
from edge.store.db import database, open_database
from edge.store.migrations import SchemaMigration, apply_steps

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("edge.store", "edge.orders", "edge.dicom", "sync", "firmware_bridge", "kiosk", "edge.console", "edge.ops")


def config_for(tmp_path: Path) -> EdgeConfig:
    return parse_config({"node": {"id": "parts-node"}, "storage": {"data_dir": str(tmp_path / "var")}}, tmp_path)


def test_every_package_declares_one_part_and_the_node_lists_it() -> None:
    declared = [importlib.import_module(f"{package}.part").PART for package in PACKAGES]
    assert all(isinstance(part, Part) for part in declared)
    assert set(declared) <= set(PARTS)
    assert len({part.name for part in PARTS}) == len(PARTS)


def test_services_start_in_the_order_the_node_always_used_and_every_part_after_what_it_needs() -> None:
    assert SERVICE_NAMES == ("dicom", "sync", "bridge", "kiosk", "console", "ops")
    position = {part.name: i for i, part in enumerate(PARTS_IN_ORDER)}
    for part in PARTS_IN_ORDER:
        assert all(position[need] < position[part.name] for need in part.after), part.name
    # edge run's two processes cover every service exactly once
    assert sorted(n for _, names in RUN_GROUPS for n in names) == sorted(SERVICE_NAMES)


def test_parts_that_wait_on_each_other_or_on_an_unknown_part_are_a_clear_error() -> None:
    a, b, c = Part("a", after=("c",)), Part("b", after=("a",)), Part("c", after=("b",))
    with pytest.raises(PartOrderError, match=r"wait on each other: a \(after c\), b \(after a\), c \(after b\)"):
        in_dependency_order([a, b, c])
    with pytest.raises(PartOrderError, match=r"'b' starts after unknown part\(s\): nowhere"):
        in_dependency_order([Part("a"), Part("b", after=("nowhere",))])
    # listed order is kept where `after` leaves a choice
    assert [p.name for p in in_dependency_order([Part("x", after=("z",)), Part("y"), Part("z")])] == ["y", "z", "x"]


def test_every_part_section_is_in_edge_config_under_its_name_and_nothing_else_is() -> None:
    declared = {name: model for part in PARTS for name, model in part.sections.items()}
    fields = {name: info.annotation for name, info in EdgeConfig.model_fields.items() if name != "base_dir"}
    assert declared == fields


def _schema(path: Path) -> dict[str, str]:
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name").fetchall())


def test_a_fresh_database_gets_the_same_tables_from_the_registry_as_from_the_old_list(tmp_path: Path) -> None:
    open_database(tmp_path / "new")
    try:
        recorded = dict(SchemaMigration.select(SchemaMigration.package, SchemaMigration.version).tuples())
    finally:
        database.close()
    # What SCHEMA_OWNERS named, in its order, recorded under the names shipped nodes hold.
    old = (("edge", "edge.store.tables"), ("sync", "sync.tables"), ("kiosk", "kiosk.tables"),
           ("firmware_bridge", "firmware_bridge.tables"), ("orders", "edge.orders.tables"),
           ("console", "edge.console.tables"))
    db = open_database(tmp_path / "old", migrate=False)
    try:
        db.create_tables([SchemaMigration], safe=True)
        for package, module in old:
            apply_steps(db, package, importlib.import_module(module).MIGRATIONS)
        old_recorded = dict(SchemaMigration.select(SchemaMigration.package, SchemaMigration.version).tuples())
    finally:
        database.close()
    new_schema, old_schema = _schema(tmp_path / "new" / "edge.db"), _schema(tmp_path / "old" / "edge.db")
    assert new_schema == old_schema
    assert recorded == old_recorded and set(recorded) == {p for p, _ in old}
    declared_tables = {table._meta.table_name for part in PARTS if part.schema for table in part.schema.tables}
    assert {n for n, sql in new_schema.items() if sql.startswith("CREATE TABLE")} == declared_tables | {"schema_migration"}


def test_the_services_migrating_a_fresh_card_together_all_start(tmp_path: Path) -> None:
    """On a box's first boot its services open the new database at the same moment: each must
    come up (one used to lose a race for a migration step and fail its start)."""
    script = ("import sys; from pathlib import Path; import edge.node.parts; from edge.store.db import open_database; "
              "open_database(Path(sys.argv[1])); print('ok')")
    for attempt in range(3):
        data = tmp_path / f"card{attempt}"
        procs = [subprocess.Popen([sys.executable, "-c", script, str(data)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(4)]
        results = [(p.wait(120), *p.communicate()) for p in procs]
        assert [r for r in results if r[0] != 0 or r[1].strip() != "ok"] == [], results
        with sqlite3.connect(data / "edge.db") as db:
            rows = db.execute("select package, version, count(*) from schema_migration group by package, version").fetchall()
        assert rows and all(count == 1 for _, _, count in rows), rows


def test_the_bridge_boxes_are_in_the_fleet_figures_because_its_part_says_so(tmp_path: Path) -> None:
    from edge.ops.metrics import fleet_registry
    from firmware_bridge.metrics import BridgeCollector

    bridge = next(part for part in PARTS if part.name == "firmware_bridge")
    assert bridge.fleet_collectors == (BridgeCollector,)
    config = config_for(tmp_path)
    open_database(config.data_dir)
    try:
        text = generate_latest(fleet_registry(config)).decode()
    finally:
        database.close()
    assert "edge_ecg_boxes_connected 0.0" in text
    assert 'edge_ecg_recordings{state="kept"} 0.0' in text
    assert "edge_outbox_depth 0.0" in text  # the node's own figures beside the part's


def test_doctor_runs_each_part_s_checks_plain_and_coroutine_after_the_node_s_own(tmp_path: Path) -> None:
    from edge.ops.doctor import run_doctor

    def plain(config: EdgeConfig) -> DoctorItem:
        return DoctorItem("plain", "pass", f"asked for {config.node.id}")

    async def coroutine(config: EdgeConfig) -> DoctorItem:
        await asyncio.sleep(0)
        return DoctorItem("coroutine", "warn", "a coroutine check", "a hint")

    items = asyncio.run(run_doctor(config_for(tmp_path), "edge.toml", parts=[Part("test", doctor_checks=(plain, coroutine))]))
    names = [item.name for item in items]
    assert names[:2] == ["config", "disk"]
    assert names[-2:] == ["plain", "coroutine"]
    assert items[-2].detail == "asked for parts-node" and items[-1].hint == "a hint"
    contributed = {check.__module__ for part in PARTS for check in part.doctor_checks}
    assert {"edge.dicom.doctor", "sync.doctor", "firmware_bridge.doctor", "kiosk.doctor"} <= contributed


def test_edge_help_lists_the_commands_every_part_adds() -> None:
    expected: set[str] = set()
    for part in PARTS:
        if part.add_commands is not None:
            sub = argparse.ArgumentParser().add_subparsers()
            part.add_commands(sub)
            expected |= set(sub.choices)
    assert {"ecg-sim", "kiosk", "user", "doctor", "provision"} <= expected
    shown = subprocess.run([sys.executable, "-m", "edge", "--help"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60, check=True).stdout
    listed = {line.split()[0] for line in shown.splitlines() if line.startswith("    ") and line.split()}
    assert expected <= listed, expected - listed


def test_what_is_kept_wakes_the_sync_service_in_this_process_else_rings_the_bell(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    dicom, sync = build_services(config, ["sync", "dicom"])  # any order asked: start order built
    assert (dicom.name, sync.name) == ("dicom", "sync")
    assert dicom.context.wake_sync._target == sync.sync.wake  # type: ignore[attr-defined]
    [alone] = build_services(config, ["dicom"])
    ring = alone.context.wake_sync._target  # type: ignore[attr-defined]
    assert isinstance(ring.__self__, OutboxBell)
    assert alone.writer is not None  # no console here: the counters go to a file for the console's process


def test_background_tasks_are_cancelled_together_and_a_crash_is_logged_by_name(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> tuple[int, int]:
        tasks = BackgroundTasks("test")
        forever = asyncio.Event()
        tasks.start(forever.wait(), name="waits")

        async def crash() -> None:
            raise RuntimeError("boom")

        crashed = tasks.start(crash(), name="crashes")
        await asyncio.wait([crashed])
        running = len(tasks)
        await tasks.stop()
        return running, len(tasks)

    with caplog.at_level(logging.ERROR, logger="edge.service"):
        running, left = asyncio.run(scenario())
    assert (running, left) == (1, 0)
    assert "test: crashes crashed: RuntimeError('boom')" in caplog.text
