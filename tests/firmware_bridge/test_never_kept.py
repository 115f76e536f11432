"""A recording the node will never accept is NAK UNSUPPORTED (the box drops it); a disk that is full is NAK STORAGE.

Before: an ECG over the ``[storage]`` decode limits came back from keep_instance as
RejectedInstance 0xA700, the same status as a full disk, and was answered NAK STORAGE, so
the box offered it again every 30 s for ever. The real limits (max_instance_mb >= 16) are far
above any ECG (16384 samples x 12 leads); the tests set them tiny, as BoxSession(limits=…) takes them.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import Any

import pytest

from edge.store.models import Instance, Outbox
from edge.store.spool import RejectedInstance, Spool
from edge.store.walk import DecodeLimits
from firmware_bridge.boxes import recordings
from firmware_bridge.const import ACQUIRED_LEADS, Msg, Nak
from firmware_bridge.protocol import Hello, NakMsg, RecEnd
from tests.firmware_bridge.helpers import SessionBox, box_session, kept_recordings
from tests.waiting import wait_until

TINY_SIZE = DecodeLimits(max_bytes=1024)  # a 50-sample ECG is a few KB
TINY_ELEMENTS = DecodeLimits(max_elements=20)  # an ECG has some hundred elements


def _hello(box_id: str) -> Hello:
    return Hello(box_id, "CE-ECG8", "1.0.0", 500, 2500, ACQUIRED_LEADS)


def refusals(caplog: pytest.LogCaptureFixture, box_id: str, rec_id: int | None = None) -> list[str]:
    """The bridge's error lines refusing a recording of ``box_id`` for good."""
    prefix = f"bridge: box {box_id} recording {'' if rec_id is None else f'{rec_id} refused'}"
    return [r.getMessage() for r in caplog.records if r.name == "firmware_bridge.session" and r.levelno == logging.ERROR
            and r.getMessage().startswith(prefix) and "NAK UNSUPPORTED" in r.getMessage()]


def nothing_kept(store: Spool) -> bool:
    return (not Instance.select().exists() and not Outbox.select().exists() and list(store.tmp.iterdir()) == []
            and list(store.root.rglob("*.dcm")) == [])


def only_nak(answers: list[tuple[int, object]]) -> NakMsg:
    [(kind, nak)] = answers
    assert kind == Msg.NAK and isinstance(nak, NakMsg), answers
    return nak


# --- a session, in process -------------------------------------------------------------------------


@pytest.mark.parametrize(("limits", "key"), [
    (TINY_SIZE, "[storage] max_instance_mb"),
    (TINY_ELEMENTS, "[storage] max_elements"),
])
def test_recording_over_a_decode_limit_is_unsupported_once_logged_and_marked_failed_with_the_limit(
    tmp_path: Path, store: Spool, caplog: pytest.LogCaptureFixture, limits: DecodeLimits, key: str
) -> None:
    session = box_session(tmp_path, store, limits=limits)
    box = SessionBox(session)
    box.say(Msg.HELLO, _hello("ECG-BIG").pack())
    caplog.set_level(logging.INFO, logger="firmware_bridge")

    nak = only_nak(box.record(11))
    assert (nak.ref_type, nak.ref_seq, nak.reason, nak.arg) == (Msg.REC_END, box.seq, Nak.UNSUPPORTED, 11)
    [row] = recordings("ECG-BIG")
    assert row["state"] == "failed" and key in row["detail"], row["detail"]
    assert row["samples"] == 50  # it had all arrived: refused for what it is
    [line] = refusals(caplog, "ECG-BIG", 11)
    assert key in line and "not to offer it again" in line
    assert session.stats.refused_recordings == 1 and session.stats.not_kept == 0 and session.stats.kept == []
    assert nothing_kept(store)
    assert not any(r.exc_info for r in caplog.records)


def test_a_refused_recording_offered_again_is_refused_again_without_another_log_line(
    tmp_path: Path, store: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    """A box that does not listen (old firmware) hears the same answer; the log and the row stay as they were."""
    session = box_session(tmp_path, store, limits=TINY_SIZE)
    box = SessionBox(session)
    box.say(Msg.HELLO, _hello("ECG-DEAF").pack())
    caplog.set_level(logging.INFO, logger="firmware_bridge")
    assert only_nak(box.record(5)).reason == Nak.UNSUPPORTED

    assert only_nak(box.record(5)).reason == Nak.UNSUPPORTED  # resent whole
    nak = only_nak(box.say(Msg.REC_END, RecEnd(5, 50).pack()))  # its REC_END alone: no BAD_STATE "send it all again"
    assert (nak.reason, nak.arg) == (Nak.UNSUPPORTED, 5)
    assert len(refusals(caplog, "ECG-DEAF")) == 1
    [row] = recordings("ECG-DEAF")
    assert row["state"] == "failed" and "[storage] max_instance_mb" in row["detail"]
    assert session.stats.refused_recordings == 3 and session.stats.not_kept == 0
    assert nothing_kept(store)


def test_a_malformed_ecg_file_is_unsupported(
    tmp_path: Path, store: Spool, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should the ECG writer ever produce a file keep_instance cannot walk, no resend would make it whole."""
    from firmware_bridge import session as session_module

    real_write = session_module.write_ecg

    def truncated_write(ds: Any, path: Path) -> None:
        real_write(ds, path)
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 100)  # ends inside the waveform data

    monkeypatch.setattr(session_module, "write_ecg", truncated_write)
    session = box_session(tmp_path, store)
    box = SessionBox(session)
    box.say(Msg.HELLO, _hello("ECG-CUT").pack())
    caplog.set_level(logging.INFO, logger="firmware_bridge")

    assert (only_nak(box.record(9)).reason, session.stats.not_kept) == (Nak.UNSUPPORTED, 0)
    [row] = recordings("ECG-CUT")
    assert row["state"] == "failed" and "truncated dataset" in row["detail"], row["detail"]
    [line] = refusals(caplog, "ECG-CUT", 9)
    assert "truncated dataset" in line
    assert nothing_kept(store)


def test_a_full_disk_under_the_same_limits_is_still_storage(
    tmp_path: Path, store: Spool, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """keep_instance's ENOSPC is 0xA700 as an over-limit instance is; the box must keep this one and retry."""
    from firmware_bridge import session as session_module

    def full_disk(*args: Any, **kwargs: Any) -> Any:
        raise RejectedInstance(0xA700, "could not keep instance: [Errno 28] No space left on device")

    monkeypatch.setattr(session_module, "keep_instance", full_disk)
    session = box_session(tmp_path, store, limits=DecodeLimits(max_bytes=1 << 20))  # the ECG fits
    box = SessionBox(session)
    box.say(Msg.HELLO, _hello("ECG-FULL").pack())
    caplog.set_level(logging.INFO, logger="firmware_bridge")

    nak = only_nak(box.record(3))
    assert (nak.reason, nak.arg) == (Nak.STORAGE, 3)
    assert session.stats.not_kept == 1 and session.stats.refused_recordings == 0
    assert refusals(caplog, "ECG-FULL") == []
    assert any("not kept" in m and "No space left" in m and "NAK STORAGE" in m for m in caplog.messages)

    monkeypatch.undo()
    [(kind, ack)] = box.record(3)  # the box's next offer, once there is room
    assert kind == Msg.ACK and ack.arg == 3  # type: ignore[attr-defined]
    [row] = kept_recordings("ECG-FULL")
    assert row["rec_id"] == 3


def test_an_ecg_the_disk_cannot_read_back_is_storage_not_unsupported(
    tmp_path: Path, store: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO reading the header back (a failing SD card) is the disk's fault, not the recording's."""
    import edge.store.walk as walk_module  # where the spool's header read takes it from, at each read

    def failing_walk(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(walk_module, "walk_instance", failing_walk)
    session = box_session(tmp_path, store)
    box = SessionBox(session)
    box.say(Msg.HELLO, _hello("ECG-EIO").pack())
    assert only_nak(box.record(4)).reason == Nak.STORAGE
    [row] = recordings("ECG-EIO")
    assert row["state"] == "failed" and "Input/output error" in row["detail"]
    assert session.stats.not_kept == 1 and session.stats.refused_recordings == 0


# --- over a pty pair, with the software box --------------------------------------------------------


def test_box_drops_a_recording_over_max_instance_mb_at_the_first_answer_and_keeps_recording(
    store: Spool, bridge: Any, box: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="firmware_bridge")
    sim = box(box_id="ECG-HUGE", record_every=0.3, recordings=1)
    running = bridge()
    session = running.session
    session.limits = DecodeLimits(max_bytes=16 * 1024)  # a 2 s ECG is about 25 KB
    sim.start()

    # Two recordings refused: the box moved on to its next after the first NAK UNSUPPORTED, never resending.
    wait_until(lambda: sim.box.stats.naks_unsupported >= 2, what="two recordings answered NAK UNSUPPORTED")
    session.limits = DecodeLimits()  # the node's real limits: the next recording fits
    stats = sim.wait()
    [kept] = kept_recordings("ECG-HUGE")
    assert stats.recordings_acked == [kept["rec_id"]] and kept["samples"] == 1000

    refused = [r for r in recordings("ECG-HUGE") if r["state"] == "failed"]
    assert len(refused) == stats.naks_unsupported >= 2
    assert all("[storage] max_instance_mb" in r["detail"] for r in refused)
    assert stats.naks_storage == 0 and session.stats.not_kept == 0
    assert session.stats.refused_recordings == stats.naks_unsupported  # one answer per recording: none offered again
    assert stats.recordings_sent == stats.naks_unsupported + 1
    for row in refused:
        [line] = refusals(caplog, "ECG-HUGE", row["rec_id"])
        assert "[storage] max_instance_mb" in line
    assert [i.sop_instance_uid for i in Instance.select()] == [kept["sop_instance_uid"]]
    assert session.stats.connects == 1
    assert not any(r.exc_info for r in caplog.records)
