"""``edge status``: the node's state in one look, for the technician and ops."""

from __future__ import annotations

from typing import Any

from edge.appliance.slots import slot_state
from edge.node.config import EdgeConfig
from edge.ops.health import check_disk, dicom_availability, disk_free_bytes, port_listening
from edge.terminal import printable
from edge.store.const import SyncState
from edge.store.queries import (
    count_instances,
    count_missing_files,
    latest_outbox_error,
    outbox_summary,
)
from firmware_bridge.boxes import box_summaries
from kiosk.printer_state import probe_printer


def node_status(config: EdgeConfig) -> dict[str, Any]:
    """Everything ``edge status --json`` prints; reads the store and the DICOM service's report, probes the console port."""
    summary = outbox_summary()
    studies, instances, size = count_instances()
    disk = check_disk(config)
    services = {
        "dicom": _dicom_state(config),
        "console": "up" if port_listening(config.console.bind_address, config.console.port) else "down",
    }
    return {
        "node": {"id": config.node.id, "name": config.node.name, "ae_title": config.dicom.ae_title},
        "services": services,
        "outbox": {
            "depth": summary.depth,
            "by_state": summary.by_state,
            "oldest_age_s": None if summary.oldest_pending_age_s is None else round(summary.oldest_pending_age_s),
            "last_upload_at": summary.last_upload_at,
            "cloud": config.cloud.dicomweb_url,
            "last_error": dict(zip(("state", "reason"), error)) if (error := latest_outbox_error()) else None,
        },
        "store": {
            "studies": studies,
            "instances": instances,
            "bytes": size,
            "files_missing": count_missing_files(),
            "data_dir": str(config.data_dir),
        },
        "disk": {
            "free_mb": round(disk_free_bytes(config) / 2**20),
            "min_free_mb": config.storage.min_free_mb,
            "ok": disk.ok,
        },
        "boxes": box_summaries(),  # ECG boxes the bridge has seen
        "printer": probe_printer(config).as_dict(),  # the kiosk printer: ok, or the cause and its fix
        "appliance": appliance_status(),  # slot and version running, a failed update; None off the appliance
    }


def appliance_status() -> dict[str, Any] | None:
    """The slots as people read them (edge.appliance.slots); None on a developer machine."""
    state = slot_state()
    return state.as_json() if state is not None else None


def _dicom_state(config: EdgeConfig) -> str:
    """"up", "full" (every association slot held: the DR is refused) or "down"; from the service's own report."""
    state = dicom_availability(config)  # not a probe: a connection would take one of the DR's slots
    if state is None:
        return "down"
    return "up" if state.accepting else "full"


def format_status(status: dict[str, Any]) -> str:
    """The human view: one line per item, problems spelled out.

    Values from the cloud (error reasons), the boxes (ids, firmware) and the config go
    through printable(): a control code in one of them must not reach the terminal.
    """
    p = printable
    node, outbox, store, disk = status["node"], status["outbox"], status["store"], status["disk"]
    lines = [f"node      {p(node['id'])} ({p(node['name'])}), AE title {p(node['ae_title'])}"]
    slots = status.get("appliance")
    if slots:
        lines.append(f"{'PROBLEM ' if slots['failed'] else 'slot    '}  {p(slots['summary'])}")
    lines += [f"service   {p(name)}: {p(state)}" for name, state in status["services"].items()]
    age = outbox["oldest_age_s"]
    lines.append(
        f"outbox    {outbox['depth']} waiting"
        + (f", oldest {age // 60} min" if age is not None else "")
        + (f", quarantined {outbox['by_state'][SyncState.QUARANTINED]}" if outbox["by_state"].get(SyncState.QUARANTINED) else "")
    )
    lines.append(f"uploaded  last at {p(outbox['last_upload_at'] or 'never')} to {p(outbox['cloud'])}")
    if outbox["last_error"] and outbox["depth"]:
        lines.append(f"PROBLEM   last upload {p(outbox['last_error']['state'])}: {p(outbox['last_error']['reason'])}")
    lines.append(f"store     {store['studies']} studies, {store['instances']} instances, {store['bytes'] / 2**20:.1f} MB")
    if store["files_missing"]:
        lines.append(f"PROBLEM   {store['files_missing']} instance file(s) missing from the spool (see event log)")
    lines.append(f"disk      {disk['free_mb']} MB free (minimum {disk['min_free_mb']} MB)" + ("" if disk["ok"] else "  PROBLEM: disk full, C-STORE refused"))
    printer = status.get("printer")
    if printer and printer["ok"]:
        lines.append(f"printer   {p(printer['where'])}: ready")
    elif printer:
        lines.append(f"PROBLEM   printer ({p(printer['where'])}): {p(printer['summary'])}; fix: {p(printer['fix'])}")
    for box in status.get("boxes", []):
        lines.append(
            f"ecg box   {p(box['box_id'])}: firmware {p(box['firmware'] or '?')}, "
            f"battery {'?' if box['battery_pct'] is None else p(box['battery_pct']) + '%'}, "
            + ("connected" if box["connected"] else f"not connected (last seen {p(box['last_seen'])})")
            + (f", LEAD OFF {p(','.join(box['lead_off']))}" if box["lead_off"] and box["connected"] else "")
        )
    return "\n".join(lines)
