"""A box that cannot make a 12-lead ECG is refused at HELLO and told so; no recording crashes the bridge.

Found by tests/fuzz/test_ecg_fuzz.py: HELLO(leads=()), REC_START, REC_END ended in
``KeyError: 'I'`` inside twelve_leads, a traceback, NAK STORAGE, and a box retrying for ever.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from firmware_bridge.boxes import box_summaries, recordings
from firmware_bridge.const import ACQUIRED_LEADS, NEEDED_LEADS, Msg, Nak
from firmware_bridge.ecg_dicom import MissingLeads, twelve_leads
from firmware_bridge.protocol import (
    Ack,
    Hello,
    LeadSetRefused,
    NakMsg,
    ProtocolError,
    RecEnd,
    RecStart,
    Status,
)
from tests.firmware_bridge.helpers import SessionBox, box_session, kept_recordings
from tests.waiting import wait_until

CHEST = ("V1", "V2", "V3", "V4", "V5", "V6")


def _hello(leads: tuple[str, ...] = ACQUIRED_LEADS, box_id: str = "ECG-H", **kw: Any) -> Hello:
    return Hello(box_id, kw.pop("model", "CE-ECG8"), kw.pop("fw", "1.0.0"), 500, 2500, leads, **kw)


# --- the parse ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("leads", "missing"), [
    ((), NEEDED_LEADS),
    (CHEST, ("I", "II")),
    (("I",) + CHEST, ("II",)),
    (("I", "II", "V1", "V2", "V3", "V4", "V5"), ("V6",)),
])
def test_hello_without_the_leads_a_12_lead_ecg_needs_is_refused_naming_them(leads: tuple[str, ...], missing: tuple[str, ...]) -> None:
    with pytest.raises(LeadSetRefused) as refused:
        Hello.parse(_hello(leads).pack())
    assert refused.value.missing == missing and refused.value.box_id == "ECG-H"
    assert ", ".join(missing) in str(refused.value)


def test_hello_with_the_eight_leads_in_any_order_parses() -> None:
    hello = _hello(tuple(reversed(ACQUIRED_LEADS)))
    assert Hello.parse(hello.pack()) == hello


@pytest.mark.parametrize("hello", [
    _hello(ACQUIRED_LEADS + ("V1",)),  # a lead twice: its columns would be ambiguous
    _hello(box_id="ECG\nbridge: forged log line"),  # control characters reach the log and DICOM
    _hello(box_id="ECG\\2"),  # LO's value delimiter
    _hello(box_id="E" * 65),
    _hello(model="\x1b[2J"),
    _hello(fw="9" * 65),
])
def test_hello_the_bridge_cannot_use_is_a_protocol_error(hello: Hello) -> None:
    with pytest.raises(ProtocolError):
        Hello.parse(hello.pack())


def test_twelve_leads_refuses_missing_leads_with_its_own_error_never_a_key_error() -> None:
    for leads in ((), CHEST, ("I", "II")):
        with pytest.raises(MissingLeads) as missing:
            twelve_leads(np.zeros((10, len(leads)), np.int16), leads)
        assert not isinstance(missing.value, KeyError) and missing.value.missing


# --- a session, in process: what the box hears and what the log says -----------------------------


def test_refused_hello_is_naked_with_the_missing_leads_once_in_the_log_and_a_good_hello_is_served(
    tmp_path: Path, store: Any, caplog: pytest.LogCaptureFixture
) -> None:
    box = SessionBox(box_session(tmp_path, store))
    caplog.set_level(logging.INFO, logger="firmware_bridge")

    [(kind, nak)] = box.say(Msg.HELLO, _hello(CHEST, box_id="ECG-NO-LIMB").pack())
    assert kind == Msg.NAK and isinstance(nak, NakMsg)
    assert (nak.ref_type, nak.ref_seq, nak.reason, nak.arg) == (Msg.HELLO, box.seq, Nak.UNSUPPORTED, 0b11)  # I, II
    for _ in range(3):  # the box says it again (replugged, or asked): NAKed again, not logged again
        assert [(k, m.reason) for k, m in box.say(Msg.HELLO, _hello(CHEST, box_id="ECG-NO-LIMB").pack())] == [  # type: ignore[attr-defined]
            (Msg.NAK, Nak.UNSUPPORTED)]
    assert box.say(Msg.STATUS, Status(80, 0, 0).pack()) == []  # no HOST_HELLO ping-pong once a second

    # What it recorded anyway cannot become a 12-lead ECG: refused for good, not STORAGE (retry for ever).
    [(kind, nak)] = box.record(41, columns=len(CHEST))
    assert kind == Msg.NAK and (nak.ref_type, nak.reason, nak.arg) == (Msg.REC_END, Nak.UNSUPPORTED, 41)  # type: ignore[attr-defined]

    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    refusals = [r.getMessage() for r in lines if "refused: its lead set" in r.getMessage()]
    assert refusals == [refusals[0]] and "ECG-NO-LIMB" in refusals[0] and "lacks I, II" in refusals[0]
    assert not any(r.exc_info for r in caplog.records)  # no traceback
    assert box_summaries() == []  # a refused box is not shown as a box the node serves

    # The box fixed: the same session serves it.
    assert box.say(Msg.HELLO, _hello(box_id="ECG-NO-LIMB").pack()) == []
    [(kind, ack)] = box.record(42)
    assert kind == Msg.ACK and isinstance(ack, Ack) and (ack.ref_type, ack.arg) == (Msg.REC_END, 42)
    [row] = kept_recordings("ECG-NO-LIMB")
    assert row["rec_id"] == 42 and row["samples"] == 50
    assert box_summaries()[0]["box_id"] == "ECG-NO-LIMB"


def test_the_fuzzers_minimal_case_is_refused_at_hello(tmp_path: Path, store: Any, caplog: pytest.LogCaptureFixture) -> None:
    box = SessionBox(box_session(tmp_path, store))
    [(_, nak)] = box.say(Msg.HELLO, Hello("0", "", "", 1, 1, leads=()).pack())
    assert (nak.reason, nak.arg) == (Nak.UNSUPPORTED, 0xFF)  # type: ignore[attr-defined]  # all eight missing
    box.say(Msg.REC_START, RecStart(0, 0, 0).pack())
    [(_, nak)] = box.say(Msg.REC_END, RecEnd(0, 0).pack())
    assert (nak.ref_type, nak.reason) == (Msg.REC_END, Nak.UNSUPPORTED)  # type: ignore[attr-defined]
    assert not any(r.exc_info for r in caplog.records) and "KeyError" not in caplog.text


def test_a_recording_that_lacks_leads_is_naked_unsupported_with_its_reason_never_storage(
    tmp_path: Path, store: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Should a lead set ever get past HELLO (a bridge bug), twelve_leads still cannot crash the box's retries."""
    session = box_session(tmp_path, store)
    box = SessionBox(session)
    box.say(Msg.HELLO, _hello(box_id="ECG-BYPASS").pack())
    session.hello = dataclasses.replace(session.hello, leads=("I", "II"))  # type: ignore[arg-type]
    [(kind, nak)] = box.record(7, columns=2)
    assert kind == Msg.NAK and (nak.reason, nak.arg) == (Nak.UNSUPPORTED, 7)  # type: ignore[attr-defined]
    [row] = recordings("ECG-BYPASS")
    assert row["state"] == "failed" and "V1, V2, V3, V4, V5, V6" in row["detail"]
    assert session.stats.not_kept == 0 and session.stats.refused_recordings == 1
    assert not any(r.exc_info for r in caplog.records)


# --- over a pty pair, with the software box ------------------------------------------------------


def test_box_with_a_wrong_lead_set_is_told_and_served_once_it_says_hello_properly(
    store: Any, bridge: Any, box: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="firmware_bridge")
    sim = box(box_id="ECG-WIRED-WRONG", record_every=0.3, recordings=1, leads=CHEST)
    running = bridge()
    sim.start()
    wait_until(lambda: sim.box.stats.hello_refused, what="the box hearing its HELLO refused")
    assert sim.box.stats.hello_refused[0] == (Nak.UNSUPPORTED, 0b11)  # the box can show "leads I, II missing"
    assert sim.box.stats.recordings_sent == 0  # a refused box does not record

    sim.box.introduce(ACQUIRED_LEADS)  # the technician fixes the box: it says HELLO again
    stats = sim.wait()
    assert len(stats.recordings_acked) == 1 and stats.naks_storage == 0
    [row] = kept_recordings("ECG-WIRED-WRONG")
    assert not row["damaged"] and row["samples"] == 1000  # 2 s at 500 Hz
    session = running.session
    assert session.stats.connects == 1  # the refusal never cost the session
    refusals = [r.getMessage() for r in caplog.records if "refused: its lead set" in r.getMessage()]
    assert len(refusals) == 1 and "ECG-WIRED-WRONG" in refusals[0] and "lacks I, II" in refusals[0]
    assert not any(r.exc_info for r in caplog.records)
