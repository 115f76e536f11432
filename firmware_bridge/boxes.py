"""Small typed functions over the bridge's tables, for the bridge, the CLI and ``edge status``."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from edge.store.db import write_transaction
from edge.store.models import log_event, utcnow
from firmware_bridge.const import ELECTRODES
from firmware_bridge.protocol import Hello, Status
from firmware_bridge.tables import Arming, Box, EcgRecording


def lead_off_names(mask: int) -> str:
    """The STATUS lead-off bitmask as electrode names ("" when every electrode is on)."""
    return ",".join(name for bit, name in enumerate(ELECTRODES) if mask & (1 << bit))


# The bridge refreshes a connected box's row at least every 10 s (its STATUS); older than
# this, the bridge itself is gone and "connected" is stale.
CONNECTED_FRESH_S = 30.0


def box_summaries() -> list[dict[str, Any]]:
    """Every box seen, for ``edge status``: id, firmware, battery, lead-off, last seen."""
    rows = []
    fresh_after = utcnow() - dt.timedelta(seconds=CONNECTED_FRESH_S)
    for box in Box.select().order_by(Box.box_id):
        connected = bool(box.connected) and box.last_seen is not None and box.last_seen >= fresh_after
        rows.append({
            "box_id": box.box_id,
            "model": box.model,
            "firmware": box.fw_version,
            "port": box.port,
            "connected": connected,
            "battery_pct": box.battery_pct,
            "lead_off": [e for e in box.lead_off.split(",") if e] if connected else [],
            "recording": bool(box.recording) and connected,
            "last_seen": box.last_seen.isoformat(timespec="seconds") + "Z" if box.last_seen else None,
            "armed": Arming.select().where(Arming.box_id == box.box_id).exists(),
        })
    return rows


def note_hello(port: str, hello: Hello) -> None:
    """A box said who it is: create or refresh its row."""
    values = {
        "model": hello.model, "fw_version": hello.fw_version, "sample_rate": hello.sample_rate,
        "nv_per_lsb": hello.nv_per_lsb, "port": port, "connected": True, "last_seen": utcnow(),
    }
    with write_transaction():
        if Box.update(**values).where(Box.box_id == hello.box_id).execute() == 0:
            Box.create(box_id=hello.box_id, **values)


def note_status(box_id: str, status: Status, recording: bool) -> None:
    with write_transaction():
        Box.update(
            battery_pct=status.battery_pct, lead_off=lead_off_names(status.lead_off),
            recording=recording, connected=True, last_seen=utcnow(),
        ).where(Box.box_id == box_id).execute()


def forget_connections() -> None:
    """At bridge start: no box is connected until it says HELLO again."""
    with write_transaction():
        Box.update(connected=False, recording=False).execute()


def note_disconnected(box_id: str) -> None:
    with write_transaction():
        Box.update(connected=False, recording=False).where(Box.box_id == box_id).execute()


@dataclass(frozen=True)
class ArmedOrder:
    """Who the next recording on a box is for."""

    arming_id: int
    patient_id: str
    patient_name: str
    accession_number: str


def arm_box(box_id: str, patient_id: str, patient_name: str = "", accession_number: str = "") -> None:
    """Link the box's next recording to a patient/order; replaces an earlier arming."""
    with write_transaction():
        Arming.delete().where(Arming.box_id == box_id).execute()
        Arming.create(box_id=box_id, patient_id=patient_id, patient_name=patient_name,
                      accession_number=accession_number, armed_at=utcnow())
        log_event("ecg_box_armed", f"box {box_id} armed, accession {accession_number or '-'}")


def disarm_box(box_id: str) -> bool:
    with write_transaction():
        return bool(Arming.delete().where(Arming.box_id == box_id).execute())


def armed_order(box_id: str) -> ArmedOrder | None:
    row = Arming.get_or_none(Arming.box_id == box_id)
    if row is None:
        return None
    return ArmedOrder(row.id, row.patient_id, row.patient_name, row.accession_number)


def recording_started(box_id: str, rec_id: int) -> None:
    """A REC_START: (re)open the row; a resent recording starts over."""
    with write_transaction():
        row = EcgRecording.get_or_none(EcgRecording.box_id == box_id, EcgRecording.rec_id == rec_id)
        if row is None:
            EcgRecording.create(box_id=box_id, rec_id=rec_id, started_at=utcnow())
        elif row.state != "kept":
            EcgRecording.update(state="receiving", started_at=utcnow(), detail="").where(
                EcgRecording.id == row.id).execute()


def recording_finished(box_id: str, rec_id: int, state: str, consumed_arming: int | None = None,
                       **values: Any) -> None:
    """Close a recording row; when it was kept for an armed order, the arming is used up.

    A kept recording stays kept: a box offering it again (its ACK was lost) and cut short
    is no reason to show the technician "interrupted" for what is safely in the spool.
    """
    this = (EcgRecording.box_id == box_id) & (EcgRecording.rec_id == rec_id)
    with write_transaction():
        query = EcgRecording.update(state=state, ended_at=utcnow(), **values).where(this)
        if state != "kept":
            query = query.where(EcgRecording.state != "kept")
        updated = query.execute()
        if not updated and not EcgRecording.select().where(this).exists():
            # its start could not be noted (a full disk then): the end still is
            EcgRecording.create(box_id=box_id, rec_id=rec_id, state=state, ended_at=utcnow(), **values)
        if consumed_arming is not None:
            Arming.delete().where(Arming.id == consumed_arming).execute()
        log_event(f"ecg_recording_{state}", f"box {box_id} recording {rec_id}",
                  sop_uid=values.get("sop_instance_uid", ""))


def recordings(box_id: str | None = None) -> list[dict[str, Any]]:
    """Recordings, newest first (tests, and the console later)."""
    query = EcgRecording.select().order_by(EcgRecording.id.desc())
    if box_id:
        query = query.where(EcgRecording.box_id == box_id)
    return [
        {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in row.__data__.items()}
        for row in query
    ]
