"""Health checks shared by /healthz, ``edge status`` and (later) ``edge doctor``."""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from typing import Any

from peewee import DatabaseError

from edge.appliance.slots import slot_state
from edge.node.config import EdgeConfig
from edge.ports import port_listening  # noqa: F401  (where status and metrics look for it)
from edge.dicom import availability
from edge.dicom.availability import DicomAvailability
from edge.store.const import SyncState
from edge.store.db import database
from edge.store.queries import (
    count_missing_files,
    largest_instance_bytes,
    latest_outbox_error,
    outbox_summary,
)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    critical: bool  # a failed critical check makes /healthz answer 503
    detail: str


def disk_free_bytes(config: EdgeConfig) -> int:
    path = config.data_dir
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_disk(config: EdgeConfig) -> Check:
    """Healthy while one more image as big as the largest kept here still fits above the minimum."""
    free_mb = disk_free_bytes(config) / 2**20
    minimum = config.storage.min_free_mb
    try:
        next_image_mb = largest_instance_bytes() / 2**20
    except DatabaseError:
        next_image_mb = 0.0
    ok = free_mb - next_image_mb >= minimum
    detail = f"{free_mb:.0f} MB free (minimum {minimum} MB)"
    if not ok:
        waiting = outbox_summary().depth
        detail += (
            f": C-STORE answers Out of Resources (0xA700); nothing synced is left to evict, "
            f"{waiting} instance(s) wait for the cloud"
        )
    return Check("disk", ok, True, detail)


def check_database() -> Check:
    try:
        database.execute_sql("SELECT 1").fetchone()
    except DatabaseError as exc:
        return Check("database", False, True, f"cannot read the database: {exc}")
    return Check("database", True, True, "readable")


def dicom_availability(config: EdgeConfig) -> DicomAvailability | None:
    """What the DICOM service last said about its slots; None when it is not running.

    Read from the file the service keeps (edge.dicom.availability), never by connecting:
    a probe would take one of the DR's association slots, and health is asked often.
    """
    state = availability.read(config.data_dir)
    return state if availability.is_current(state) else None


def check_dicom(config: EdgeConfig) -> Check:
    """Failing when the DR could not associate now: the service is not running, or every slot is held."""
    cfg = config.dicom
    where = f"{cfg.ae_title} on port {cfg.port}"
    state = availability.read(config.data_dir)
    if state is None or not state.listening:
        return Check("dicom", False, True, f"{where}: DICOM service not running")
    if not availability.is_current(state):
        return Check("dicom", False, True,
                     f"{where}: DICOM service not running (last heard from {availability.age_s(state):.0f} s ago)")
    in_use = f"{state.slots_used} of {state.slots_max} associations in use"
    if state.held_by_strangers:
        in_use += f", {state.held_by_strangers} by peers that are not a configured modality"
    if not state.accepting:
        return Check("dicom", False, True, f"{where}: cannot accept the DR now ({in_use}); "
                     "each is closed when its network_timeout_s runs out")
    return Check("dicom", True, True, f"{where} accepting ({in_use})")


def check_spool_files() -> Check:
    missing = count_missing_files()
    return Check("spool_files", missing == 0, False, f"{missing} instance file(s) missing from the spool" if missing else "all present")


def check_outbox() -> Check:
    summary = outbox_summary()
    quarantined = summary.by_state.get(SyncState.QUARANTINED, 0)
    detail = f"{summary.depth} waiting for the cloud"
    if quarantined:
        detail += f", {quarantined} quarantined (need a human: edge studies)"
    return Check("outbox", quarantined == 0, False, detail)


def check_cloud(config: EdgeConfig) -> Check:
    """Degraded (not failing) while uploads fail: the node keeps everything and retries."""
    summary = outbox_summary()
    failing = summary.by_state.get(SyncState.FAILED, 0)
    error = latest_outbox_error()
    if failing and error:
        return Check("cloud", False, False, f"{failing} instance(s) failing to upload: {error[1]}")
    return Check("cloud", True, False, f"last upload {summary.last_upload_at or 'never'} to {config.cloud.dicomweb_url}")


def check_update() -> Check | None:
    """Degraded (not failing) after an update that did not come up: the old slot runs, ops must look."""
    state = slot_state()
    if state is None:  # not the appliance
        return None
    return Check("update", not state.failed, False, state.summary)


def run_checks(config: EdgeConfig, services: tuple[str, ...] = ("dicom",)) -> list[Check]:
    checks = [check_database(), check_disk(config)]
    if (update := check_update()) is not None:
        checks.append(update)
    if "dicom" in services:
        checks.append(check_dicom(config))
    if checks[0].ok:
        checks += [check_spool_files(), check_outbox()]
        if "sync" in services:
            checks.append(check_cloud(config))
    return checks


def health_report(config: EdgeConfig, checks: list[Check]) -> tuple[bool, dict[str, Any]]:
    """(healthy, JSON body): unhealthy only when a critical check fails."""
    healthy = all(c.ok for c in checks if c.critical)
    degraded = any(not c.ok for c in checks)
    status = "ok" if not degraded else ("degraded" if healthy else "failing")
    slots = slot_state()
    return healthy, {
        "status": status,
        "node_id": config.node.id,
        "checks": {c.name: {k: v for k, v in asdict(c).items() if k != "name"} for c in checks},
        "appliance": slots.as_json() if slots is not None else None,  # slot and version running
    }
