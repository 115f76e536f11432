"""Mutated frames to the ECG frame parser (COBS, CRC, messages) and to a box session.

In process with hypothesis: the decoder takes any bytes without raising and without
buffering more than its bound; a message parse raises only ``ProtocolError``; valid frames
survive any garbage between them; a session fed any sequence of well-framed messages never
lets an exception out or logs one. End to end: the software box on a pty pair with garbage
and damaged frames interleaved; every recording still arrives whole.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edge.store.db import database, open_database
from edge.store.spool import Spool
from firmware_bridge.const import ACQUIRED_LEADS, MAX_FRAME, Msg
from firmware_bridge.lines import PtyLine
from firmware_bridge.protocol import (
    Frame,
    FrameDecoder,
    Hello,
    ProtocolError,
    RecEnd,
    RecStart,
    Samples,
    Status,
    encode_frame,
    parse,
)
from firmware_bridge.session import BoxSession
from firmware_bridge.simulator import SoftwareBox
from tests.firmware_bridge.conftest import RunningBridge, bridge_config
from tests.firmware_bridge.helpers import kept_dataset, kept_recordings, raw_waveform
from tests.fuzz import mutate
from tests.waiting import wait_until

EXAMPLES = max(50, int(mutate.budget_s() * 5))  # hypothesis examples per property, from the budget
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=mutate.seed() == mutate.DEFAULT_SEED,
                database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

chunks = st.lists(st.binary(max_size=3 * MAX_FRAME), max_size=8)


@FUZZ
@given(chunks)
def test_decoder_takes_any_bytes_and_buffers_at_most_its_bound(pieces: list[bytes]) -> None:
    decoder = FrameDecoder()
    for piece in pieces:
        for frame in decoder.feed(piece):
            assert frame is None or (isinstance(frame, Frame) and len(frame.payload) <= MAX_FRAME)
        assert len(decoder._buf) <= 2 * MAX_FRAME  # no delimiter in sight: thrown away, not kept
    assert decoder.stats.bytes == sum(map(len, pieces))


@FUZZ
@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 0xFFFF), st.binary(max_size=MAX_FRAME - 6))
def test_any_well_framed_message_parses_or_raises_protocol_error(version: int, kind: int, seq: int, payload: bytes) -> None:
    [frame] = FrameDecoder().feed(encode_frame(kind, seq, payload, version))
    assert frame is not None and frame.payload == payload
    try:
        parse(frame)
    except ProtocolError:
        pass


def _garbage() -> st.SearchStrategy[bytes]:
    """Line noise, including delimiters and damaged copies of real frames."""
    frame = encode_frame(Msg.STATUS, 7, Status(50, 0, 0).pack())
    damaged = st.tuples(st.integers(1, len(frame) - 2), st.integers(1, 255)).map(
        lambda p: frame[: p[0]] + bytes([frame[p[0]] ^ p[1]]) + frame[p[0] + 1 :])
    return st.one_of(st.binary(max_size=300), damaged, st.just(frame[: len(frame) // 2]))


@FUZZ
@given(st.lists(st.tuples(_garbage(), st.binary(max_size=400)), min_size=1, max_size=6), st.integers(1, 64))
def test_valid_frames_survive_any_garbage_between_them(pairs: list[tuple[bytes, bytes]], chunk: int) -> None:
    wire = b""
    sent = []
    for i, (noise, payload) in enumerate(pairs):
        wire += noise + encode_frame(Msg.SAMPLES, i, payload)
        sent.append(payload)
    decoder = FrameDecoder()
    got = [f for k in range(0, len(wire), chunk) for f in decoder.feed(wire[k : k + chunk]) if f is not None]
    payloads = iter(f.payload for f in got if f.type == Msg.SAMPLES)
    assert all(p in payloads for p in sent), "a valid frame was lost to the garbage before it"


# --- a box session fed any message sequence ------------------------------------------------------

# The bridge refuses a HELLO without all of I, II, V1-V6 or with an unprintable name (NAK UNSUPPORTED):
# the strategies offer the refused and the accepted kinds about equally, so the recording path is fuzzed too.
_leads = st.lists(st.integers(0, len(ACQUIRED_LEADS) - 1), max_size=10).map(lambda c: tuple(ACQUIRED_LEADS[i] for i in c))
_printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
_box_id = st.one_of(st.text(_printable, min_size=1, max_size=20), st.text(min_size=1, max_size=20))
_name = st.one_of(st.text(_printable, max_size=10), st.text(max_size=10))
_hello = st.builds(Hello, _box_id, _name, _name, st.integers(1, 0xFFFF), st.integers(1, 2**32 - 1),
                   st.one_of(st.permutations(ACQUIRED_LEADS), _leads), st.integers(0, 255))
_rec_id = st.integers(0, 3)
_samples = st.builds(lambda r, first, n, leads: Samples(r, first, np.zeros((n, leads), "<i2")),
                     _rec_id, st.one_of(st.integers(0, 20000), st.integers(0, 2**32 - 1)), st.integers(0, 25),
                     st.one_of(st.just(len(ACQUIRED_LEADS)), st.integers(0, 9)))
_messages = st.one_of(
    _hello.map(lambda m: (Msg.HELLO, m.pack())),
    st.builds(Status, st.integers(0, 255), st.integers(0, 255), st.integers(0, 0xFFFF)).map(lambda m: (Msg.STATUS, m.pack())),
    _samples.map(lambda m: (Msg.SAMPLES, m.pack())),
    st.builds(RecStart, _rec_id, st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1)).map(lambda m: (Msg.REC_START, m.pack())),
    st.builds(RecEnd, _rec_id, st.integers(0, 2**32 - 1), st.integers(0, 255)).map(lambda m: (Msg.REC_END, m.pack())),
    st.tuples(st.integers(0, 255), st.binary(max_size=64)),  # any type, any payload
)


class _Writer:
    """Stands in for the serial port's writer: what the bridge answers is parsed back."""

    def __init__(self) -> None:
        self.sent = bytearray()

    def write(self, data: bytes) -> None:
        self.sent += data


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def session_store(tmp_path_factory: pytest.TempPathFactory) -> Any:
    where = tmp_path_factory.mktemp("ecg-session")
    open_database(where / "var")
    yield where, Spool(where / "var")
    database.close()


def _a_recording(hello: Hello, rec_id: int, n: int) -> list[tuple[int, bytes]]:
    """A box's whole recording: HELLO, REC_START, one SAMPLES of every lead, REC_END."""
    data = np.zeros((n, len(hello.leads)), "<i2")
    return [(Msg.HELLO, hello.pack()), (Msg.REC_START, RecStart(rec_id, hello.sample_rate, n).pack()),
            (Msg.SAMPLES, Samples(rec_id, 0, data).pack()), (Msg.REC_END, RecEnd(rec_id, n).pack())]


# A sequence of any messages, or a whole recording with any messages slipped in somewhere.
_sequences = st.one_of(
    st.lists(_messages, max_size=25),
    st.builds(lambda rec, more, at: rec[:at] + more + rec[at:],
              st.builds(_a_recording, _hello, _rec_id, st.integers(1, 25)), st.lists(_messages, max_size=6),
              st.integers(0, 4)),
)


def _hello_outcome(payload: bytes) -> str:
    try:
        Hello.parse(payload)
    except ProtocolError:
        return "hello refused"
    return "hello accepted"


def test_a_session_fed_any_messages_never_raises_or_logs_an_exception(session_store: Any) -> None:
    where, spool = session_store
    config = bridge_config(where, where / "no-such-port")
    seen: dict[str, int] = {}

    @FUZZ
    @given(_sequences)
    @example([(Msg.HELLO, Hello("0", "", "", 1, 1, leads=()).pack()),  # found by this property: a HELLO without
              (Msg.REC_START, RecStart(0, 0, 0).pack()),              # leads I and II, then a recording:
              (Msg.REC_END, RecEnd(0, 0).pack())])                    # KeyError 'I' in build_ecg, NAK STORAGE for ever
    def session_fed(messages: list[tuple[int, bytes]]) -> None:
        session = BoxSession("fuzz-port", config.bridge, spool, "Fuzz Clinic", "edge-fuzz")
        session._writer = _Writer()  # type: ignore[assignment]
        errors = _Errors()
        logging.getLogger("firmware_bridge").addHandler(errors)

        async def feed() -> None:
            for seq, (kind, payload) in enumerate(messages):
                await session._on_frame(Frame(1, kind, seq, payload))

        try:
            asyncio.run(feed())
        finally:
            logging.getLogger("firmware_bridge").removeHandler(errors)
        crashes = [r for r in errors.records if r.exc_info]
        assert not crashes, f"{crashes[0].getMessage()}: {crashes[0].exc_info[1]!r}"  # type: ignore[index]
        for frame in FrameDecoder().feed(bytes(session._writer.sent)):  # type: ignore[attr-defined]
            assert frame is not None  # every answer is a well-formed frame
        for outcome in [_hello_outcome(p) for kind, p in messages if kind == Msg.HELLO] + (
                ["recording kept"] if session.stats.kept else []):
            seen[outcome] = seen.get(outcome, 0) + 1

    session_fed()
    # Both sides of the bridge's HELLO check, and the recording path behind it, were fuzzed.
    assert seen.get("hello refused", 0) >= EXAMPLES // 10, seen
    assert seen.get("hello accepted", 0) >= EXAMPLES // 10, seen
    assert seen.get("recording kept", 0) >= 1, seen
    print(f"\nbox session: {seen}")


# --- end to end: the software box on a pty pair, garbage interleaved ----------------------------


class NoisyLine:
    """The box's end of the pty, with garbage and damaged frames slipped in between its frames."""

    def __init__(self, line: PtyLine, rng: random.Random) -> None:
        self.line, self.rng = line, rng
        self.injected = 0
        self._lock = threading.Lock()

    def plug(self) -> None:
        self.line.plug()

    def unplug(self) -> None:
        self.line.unplug()

    def close(self) -> None:
        self.line.close()

    def read(self, timeout: float) -> bytes:
        return self.line.read(timeout)

    def write(self, data: bytes, timeout: float = 1.0) -> bool:
        with self._lock:
            if self.rng.random() < 0.3:
                self.line.write(self._noise(data), timeout)
                self.injected += 1
            return self.line.write(data, timeout)

    def _noise(self, frame: bytes) -> bytes:
        """Never ends in a delimiter-free half frame glued to the next one: the box's frame starts with 0x00."""
        choice = self.rng.randrange(5)
        if choice == 0:
            return self.rng.randbytes(self.rng.randint(1, 200))
        if choice == 1 and len(frame) > 4:  # a damaged copy (CRC or COBS fails)
            i = self.rng.randrange(1, len(frame) - 1)
            return frame[:i] + bytes([frame[i] ^ self.rng.randrange(1, 256)]) + frame[i + 1 :]
        if choice == 2:  # a truncated copy
            return frame[: self.rng.randrange(1, max(2, len(frame)))]
        if choice == 3:  # well framed, but an unknown type or another protocol version
            return encode_frame(self.rng.choice((0x09, 0x33, 0x99, 0xFF)), self.rng.randrange(65536), self.rng.randbytes(20),
                               version=self.rng.choice((1, 2, 0)))
        return encode_frame(Msg.STATUS, self.rng.randrange(65536), self.rng.randbytes(self.rng.randrange(3)))  # too short: ProtocolError


def test_recordings_arrive_whole_through_a_noisy_line(tmp_path: Path) -> None:
    data = tmp_path / "var"
    open_database(data)
    link = tmp_path / "usb-ClinicEdge_ECG-fuzz"
    rng = random.Random(mutate.seed())
    line = NoisyLine(PtyLine(link), rng)
    box = SoftwareBox(line, box_id="ECG-FUZZ", speed=10.0, seconds=2.0, keep_samples=True, record_every=0.5, recordings=3)
    bridge = RunningBridge(bridge_config(tmp_path, link), Spool(data)).start()
    try:
        wait_until(lambda: bridge.session.stats.connects >= 1, what="bridge opened the port")
        stats = box.run(duration=60)
        assert box.done(), f"only {len(set(stats.recordings_acked))} of 3 recordings acknowledged"
        session = bridge.session
        assert line.injected > 0 and session.stats.garbage + session.stats.crc_errors > 0
        assert session.stats.connects == 1  # noise never cost the session
        kept = kept_recordings("ECG-FUZZ")
        assert len(kept) == 3
        for row in kept:
            assert not row["damaged"] and row["missing_samples"] == 0
            raw = raw_waveform(kept_dataset(Spool(data), row["sop_instance_uid"]))
            sent = stats.sent_samples[row["rec_id"]]
            assert np.array_equal(raw[:, [0, 1]], sent[:, [0, 1]])  # leads I and II exactly as sent
    finally:
        box.stop()
        bridge.stop()
        line.close()
        database.close()


