"""A box that misbehaves on purpose (or by a firmware bug) cannot flood the log or rewrite what was kept."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from firmware_bridge.boxes import recordings
from firmware_bridge.const import ACQUIRED_LEADS, Msg
from firmware_bridge.protocol import Ack, Hello
from tests.firmware_bridge.helpers import SessionBox, box_session


def _hello(box_id: str) -> bytes:
    return Hello(box_id, "CE-ECG8", "1.0.0", 500, 2500, ACQUIRED_LEADS).pack()


def test_a_flood_of_bad_messages_is_one_log_line(tmp_path: Path, store: Any, caplog: pytest.LogCaptureFixture) -> None:
    session = box_session(tmp_path, store)
    box = SessionBox(session)
    box.say(Msg.HELLO, _hello("ECG-FLOOD"))
    caplog.set_level(logging.INFO, logger="firmware_bridge")
    for _ in range(500):
        assert box.say(Msg.STATUS, b"\x01") == []  # too short: ignored
    assert session.stats.bad_messages == 500
    assert len([r for r in caplog.records if "bad message" in r.getMessage()]) == 1


def test_a_kept_recording_offered_again_and_cut_short_stays_kept(tmp_path: Path, store: Any) -> None:
    box = SessionBox(box_session(tmp_path, store))
    box.say(Msg.HELLO, _hello("ECG-AGAIN"))
    [(kind, ack)] = box.record(5)
    assert kind == Msg.ACK and isinstance(ack, Ack) and ack.arg == 5
    box.record(5, end=False)  # our ACK was lost: the box offers it again ...
    box.say(Msg.HELLO, _hello("ECG-AGAIN"))  # ... and restarts half way
    [row] = recordings("ECG-AGAIN")
    assert row["state"] == "kept" and row["sop_instance_uid"]  # the technician still sees it kept
    [(kind, ack)] = box.record(5)  # offered whole once more: the same instance, ACKed, not stored twice
    assert kind == Msg.ACK and ack.arg == 5  # type: ignore[attr-defined]
    assert [r["state"] for r in recordings("ECG-AGAIN")] == ["kept"]
