"""The software ECG box (``edge ecg-sim``): speaks PROTOCOL.md on a serial line.

It behaves as the firmware team's box should: HELLO on start-up and when asked, STATUS
every second, a 10 s recording when its button is pressed (here: every ``record_every``
seconds), the recording kept until the node ACKs it and offered again after a replug,
and firmware updates that only take effect after a verified COMMIT. Time can run faster
than the wall clock (``speed``) so tests cover minutes of streaming in seconds; the line
is accounted at the real baud rate either way.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from firmware_bridge.const import (
    ACQUIRED_LEADS,
    ELECTRODES,
    FLAG_RECORDING,
    PROTOCOL_VERSION,
    SAMPLES_PER_BLOCK,
    Msg,
    Nak,
)
from firmware_bridge.firmware import image_version
from firmware_bridge.lines import LineDown
from firmware_bridge.protocol import (
    Ack,
    FrameDecoder,
    FwBegin,
    FwChunk,
    Hello,
    NakMsg,
    RecEnd,
    RecStart,
    Samples,
    SeqCounter,
    Status,
    encode_frame,
    parse,
)
from firmware_bridge.synth import EcgSynth

log = logging.getLogger(__name__)

INJECTIONS = ("garbage", "crc", "lead-off", "noise", "drop", "disconnect")
ACK_TIMEOUT_S = 2.0  # wall seconds before REC_END is sent again
MAX_FIRMWARE = 4 * 2**20
STORAGE_RETRY_S = 30.0  # box seconds to wait after the node could not keep a recording


class Line(Protocol):
    def plug(self) -> None: ...
    def unplug(self) -> None: ...
    def close(self) -> None: ...
    def read(self, timeout: float) -> bytes: ...
    def write(self, data: bytes, timeout: float = 1.0) -> bool: ...


@dataclass
class BoxStats:
    """What the box sent, for tests and the benchmark."""

    frames: int = 0
    bytes: int = 0
    overruns: int = 0  # frames the line could not take (nobody reading)
    recordings_sent: int = 0
    recordings_acked: list[int] = field(default_factory=list)
    sent_samples: dict[int, object] = field(default_factory=dict)  # rec_id -> (n, 8) int16 as sent
    naks_bad_frame: int = 0
    naks_storage: int = 0  # REC_END answered NAK STORAGE: the node could not keep it (the box still holds it)
    naks_unsupported: int = 0  # REC_END answered NAK UNSUPPORTED: never storable, not offered again
    hello_refused: list[tuple[int, int]] = field(default_factory=list)  # (reason, arg) of each NAK to a HELLO
    sim_seconds: float = 0.0

    def line_utilisation(self, baud: int) -> float:
        """Share of the line's capacity used (8N1: 10 bits a byte)."""
        return self.bytes * 10 / baud / self.sim_seconds if self.sim_seconds else 0.0


class SoftwareBox:
    """One box on one line; ``run()`` until ``stop()`` or the wanted recordings are ACKed."""

    def __init__(
        self,
        line: Line,
        box_id: str = "ECG-SIM-0001",
        heart_rate: float = 72.0,
        *,
        sample_rate: int = 500,
        nv_per_lsb: int = 2500,
        fw_version: str = "1.0.0",
        model: str = "CE-ECG8",
        baud: int = 115200,
        speed: float = 1.0,
        record_every: float = 0.0,
        seconds: float = 10.0,
        recordings: int = 0,
        inject: tuple[str, ...] = (),
        reject_firmware: bool = False,
        corrupt_chunk: int | None = None,
        battery_pct: int = 87,
        keep_samples: bool = False,
        seed: int = 1,
        leads: tuple[str, ...] = ACQUIRED_LEADS,
    ) -> None:
        """``leads``: the lead set HELLO announces (a box wired or configured wrongly sends fewer)."""
        unknown = set(inject) - set(INJECTIONS)
        if unknown:
            raise ValueError(f"unknown injection(s): {', '.join(sorted(unknown))}")
        self.line = line
        self.box_id, self.model, self.fw_version = box_id, model, fw_version
        self.sample_rate, self.nv_per_lsb, self.baud, self.speed = sample_rate, nv_per_lsb, baud, speed
        self.record_every, self.seconds, self.recordings = record_every, seconds, recordings
        self.inject = set(inject)
        self.reject_firmware = reject_firmware
        self.corrupt_chunk = corrupt_chunk if corrupt_chunk is not None else None
        self.battery_pct = battery_pct
        self.keep_samples = keep_samples
        self.leads = tuple(leads)
        self.refused = False  # the node NAKed our HELLO: no recording until we introduce ourselves again
        self.rng = random.Random(seed)
        lead_off = (4,) if "lead-off" in self.inject else ()  # V3
        self.lead_off_mask = (1 << ELECTRODES.index("V3")) if lead_off else 0
        self.synth = EcgSynth(heart_rate, sample_rate, nv_per_lsb, noise="noise" in self.inject, lead_off=lead_off, seed=seed)
        self.stats = BoxStats()
        self._seq = SeqCounter()
        self._write = threading.Lock()
        self._stop = threading.Event()
        self._hello_wanted = threading.Event()
        self._recording = False
        self._rec_counter = self.rng.randrange(1, 2**31)
        self._pending: tuple[int, list[tuple[Msg, bytes]], float] | None = None  # unacked recording
        # The reader thread's ACKs and NAKs and the main loop's offers change _pending and the ACKed
        # list together under this lock, so the loop never sees a recording ACKed but not yet counted.
        self._held = threading.Lock()
        self._replay = threading.Event()
        self._replay_after = 0.0
        self._fw: dict[str, object] = {}
        self._chunks_seen = 0
        self._plugged = threading.Event()
        self._plugged.set()

    # --- the line ----------------------------------------------------------------------------

    def _send(self, msg: Msg, payload: bytes, *, drop: bool = False, corrupt: bool = False) -> None:
        frame = encode_frame(msg, self._seq.next(), payload, PROTOCOL_VERSION)
        if drop:
            return  # the sequence number is used up: the node sees the gap
        if corrupt:
            i = len(frame) // 2
            frame = frame[:i] + bytes([frame[i] ^ 0x5A]) + frame[i + 1 :]
        with self._write:
            try:
                ok = self.line.write(frame)
            except LineDown:
                return
        if ok:
            self.stats.frames += 1
            self.stats.bytes += len(frame)
        else:
            self.stats.overruns += 1

    def _hello(self) -> None:
        with self._write:
            try:
                self.line.write(b"\x00")  # ends whatever half frame the node holds
            except LineDown:
                return
        self._send(Msg.HELLO, Hello(self.box_id, self.model, self.fw_version, self.sample_rate, self.nv_per_lsb,
                                    self.leads).pack())

    @property
    def _columns(self) -> list[int]:
        """The synthesiser's columns (all eight acquired leads) for the lead set we announce."""
        return [ACQUIRED_LEADS.index(lead) for lead in self.leads]

    def introduce(self, leads: tuple[str, ...]) -> None:
        """Say HELLO again with another lead set (the technician fixed the box's lead configuration)."""
        self.leads = tuple(leads)
        self._hello()  # before recording may start again: the node must know us by its first REC_START
        self.refused = False

    def _status(self) -> None:
        flags = FLAG_RECORDING if self._recording else 0
        self._send(Msg.STATUS, Status(self.battery_pct, flags, self.lead_off_mask).pack())

    # --- receiving ---------------------------------------------------------------------------

    def _reader(self) -> None:
        decoder = FrameDecoder()
        while not self._stop.is_set():
            if not self._plugged.wait(0.1):
                continue
            try:
                data = self.line.read(0.1)
            except LineDown:
                time.sleep(0.05)
                continue
            for frame in decoder.feed(data):
                if frame is None:
                    if self._fw:  # mid-update: say so, the node sends its chunk again
                        self.stats.naks_bad_frame += 1
                        self._send(Msg.NAK, NakMsg(0, 0, Nak.BAD_FRAME).pack())
                    continue
                try:
                    self._on_frame(frame.type, frame.seq, parse(frame))
                except ValueError:
                    self._send(Msg.NAK, NakMsg(frame.type, frame.seq, Nak.UNSUPPORTED).pack())

    def _on_frame(self, kind: int, seq: int, msg: object) -> None:
        if kind == Msg.HOST_HELLO:
            self._hello_wanted.set()
        elif isinstance(msg, Ack) and msg.ref_type == Msg.REC_END:
            with self._held:
                acked = self._pending is not None and self._pending[0] == msg.arg
                if acked:
                    self._pending = None
                    self.stats.recordings_acked.append(msg.arg)
            if acked:
                log.info("ecg-sim: recording %d acknowledged by the node", msg.arg)
        elif isinstance(msg, NakMsg) and msg.ref_type == Msg.HELLO:
            self.refused = True  # a real box shows this on its display
            self.stats.hello_refused.append((msg.reason, msg.arg))
            missing = [lead for code, lead in enumerate(ACQUIRED_LEADS) if msg.arg & (1 << code)]
            log.warning("ecg-sim: the node refused this box's HELLO (NAK %s%s)", _nak_name(msg.reason),
                        f": lead set lacks {', '.join(missing)}" if missing else "")
        elif isinstance(msg, NakMsg) and msg.ref_type == Msg.REC_END:
            with self._held:
                if self._pending is None or self._pending[0] != msg.arg:
                    return
                if msg.reason == Nak.UNSUPPORTED:
                    self._pending = None  # the node can never keep it: offering it again would only repeat this
                    self.stats.naks_unsupported += 1
                else:
                    if msg.reason == Nak.STORAGE:  # the node's disk is full: give it time
                        self.stats.naks_storage += 1
                        self._replay_after = time.monotonic() + STORAGE_RETRY_S / self.speed
                    self._replay.set()
            if msg.reason == Nak.UNSUPPORTED:
                log.warning("ecg-sim: recording %d refused for good by the node (NAK UNSUPPORTED)", msg.arg)
        elif Msg.FW_BEGIN <= kind <= Msg.FW_ROLLBACK:
            self._firmware(kind, seq, msg)

    def _firmware(self, kind: int, seq: int, msg: object) -> None:
        def ack(arg: int = 0) -> None:
            self._send(Msg.ACK, Ack(kind, seq, arg).pack())

        def nak(reason: Nak, arg: int = 0) -> None:
            self._send(Msg.NAK, NakMsg(kind, seq, reason, arg).pack())

        fw = self._fw
        if kind == Msg.FW_BEGIN and isinstance(msg, FwBegin):
            if self._recording:
                return nak(Nak.BUSY)
            if msg.size > MAX_FIRMWARE:
                return nak(Nak.TOO_LARGE)
            self._fw = {"size": msg.size, "sha": msg.sha256, "data": bytearray(), "state": "receiving"}
            self._chunks_seen = 0
            return ack()
        if not fw:
            return nak(Nak.BAD_STATE)
        data: bytearray = fw["data"]  # type: ignore[assignment]
        if kind == Msg.FW_CHUNK and isinstance(msg, FwChunk):
            self._chunks_seen += 1
            if self.corrupt_chunk is not None and self._chunks_seen == self.corrupt_chunk:
                self.stats.naks_bad_frame += 1  # line noise hit this chunk: its CRC fails here
                return self._send(Msg.NAK, NakMsg(0, 0, Nak.BAD_FRAME).pack())
            if msg.offset + len(msg.data) <= len(data):
                return ack(msg.offset)  # a repeat of one we have
            if msg.offset != len(data) or msg.offset + len(msg.data) > fw["size"]:  # type: ignore[operator]
                return nak(Nak.BAD_OFFSET, len(data))
            data += msg.data
            return ack(msg.offset)
        if kind == Msg.FW_END:
            return ack() if len(data) == fw["size"] else nak(Nak.BAD_STATE, len(data))
        if kind == Msg.FW_VERIFY:
            staged = bytes(data)
            if self.reject_firmware and staged:  # a flash write error: one byte reads back wrong
                staged = bytes([staged[0] ^ 0xFF]) + staged[1:]
            if hashlib.sha256(staged).digest() != fw["sha"] or len(staged) != fw["size"]:
                return nak(Nak.HASH_MISMATCH)
            fw["state"] = "verified"
            return ack()
        if kind == Msg.FW_ROLLBACK:
            self._fw = {}
            log.info("ecg-sim: firmware update rolled back; still on %s", self.fw_version)
            return ack()
        if kind == Msg.FW_COMMIT:
            if fw.get("state") != "verified":
                return nak(Nak.BAD_STATE)
            try:
                version = image_version(bytes(data))
            except ValueError:
                return nak(Nak.BAD_STATE)
            ack()
            self._fw = {}
            self.fw_version = version
            log.info("ecg-sim: firmware %s committed; restarting", version)
            time.sleep(0.2)  # the reboot
            self._hello()

    # --- the box's main loop ------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    @property
    def unacknowledged(self) -> int | None:
        """The finished recording the box still holds for the node, if any."""
        pending = self._pending  # one read: the reader thread may clear it meanwhile
        return pending[0] if pending else None

    def done(self) -> bool:
        return bool(self.recordings) and len(set(self.stats.recordings_acked)) >= self.recordings  # an ACK may come twice

    def run(self, duration: float = 0.0) -> BoxStats:
        """Run until stopped, ``duration`` wall seconds, or the wanted recordings are ACKed."""
        reader = threading.Thread(target=self._reader, name="ecg-sim-reader", daemon=True)
        reader.start()
        t0 = time.monotonic()
        self._clock0 = t0
        self._hello()
        next_status = 0.0
        next_record = self.record_every if self.record_every else float("inf")
        disconnected_once = False
        try:
            while not self._stop.is_set() and not self.done():
                if duration and time.monotonic() - t0 > duration:
                    break
                now = self._sim_now()
                if self._hello_wanted.is_set():
                    self._hello_wanted.clear()
                    self._hello()
                    if self._pending is not None:
                        self._replay.set()  # the node came (back): offer what it has not ACKed
                if now >= next_status:
                    self._status()
                    next_status = now + 1.0
                if self._replay.is_set() and self._pending is not None and time.monotonic() >= self._replay_after:
                    self._replay.clear()
                    self._replay_pending()
                elif (rec_end := self._ack_overdue()) is not None:
                    self._send(Msg.REC_END, rec_end)
                if now >= next_record and not self._fw and not self.refused and self._button_wanted():
                    unplug_at = 0.4 if ("disconnect" in self.inject and not disconnected_once) else None
                    self._record(unplug_at)
                    disconnected_once = disconnected_once or unplug_at is not None
                    next_record = self._sim_now() + self.record_every
                if "garbage" in self.inject and self.rng.random() < 0.05:
                    self._garbage()
                self._sleep_sim(0.1)
        finally:
            self.stats.sim_seconds = self._sim_now()
            self._stop.set()
            reader.join(1.0)
        return self.stats

    def _ack_overdue(self) -> bytes | None:
        """The held recording's REC_END, to say again, once the node has been silent on it for ACK_TIMEOUT_S."""
        with self._held:
            if self._pending is None or time.monotonic() - self._pending[2] <= ACK_TIMEOUT_S:
                return None
            rec_id, frames, _ = self._pending
            self._pending = (rec_id, frames, time.monotonic())
            return frames[-1][1]

    def _button_wanted(self) -> bool:
        """Nothing held for the node and recordings still wanted: asked in one look, under the lock.

        The ACK that frees the box also completes what it was asked for; looking at the two apart
        let an ACK landing in between start one recording too many (the CI flake of the full-disk test).
        """
        with self._held:
            return self._pending is None and not self.done()

    def _sim_now(self) -> float:
        return (time.monotonic() - self._clock0) * self.speed

    def _sleep_sim(self, seconds: float) -> None:
        self._stop.wait(seconds / self.speed)

    def _garbage(self) -> None:
        junk = bytes(self.rng.randrange(256) for _ in range(self.rng.randrange(3, 40)))
        with self._write:
            try:
                self.line.write(junk)
            except LineDown:
                pass

    def _record(self, unplug_at: float | None) -> None:
        """One button press: REC_START, blocks of samples paced by the sample clock, REC_END."""
        self._rec_counter = (self._rec_counter + 1) & 0xFFFFFFFF
        rec_id = self._rec_counter
        total = int(self.seconds * self.sample_rate)
        frames: list[tuple[Msg, bytes]] = [(Msg.REC_START, RecStart(rec_id, self.sample_rate, total).pack())]
        self._recording = True
        self.stats.recordings_sent += 1
        log.info("ecg-sim: box %s recording %d started", self.box_id, rec_id)
        self._send(*frames[0])
        start = self._sim_now()
        next_status = start + 1.0
        blocks = []
        drop_at = total // 2 // SAMPLES_PER_BLOCK if "drop" in self.inject else -1
        crc_every = 40 if "crc" in self.inject else 0
        for index, first in enumerate(range(0, total, SAMPLES_PER_BLOCK)):
            if self._stop.is_set():
                break
            n = min(SAMPLES_PER_BLOCK, total - first)
            due = start + (first + n) / self.sample_rate  # a block leaves once its samples exist
            while self._sim_now() < due:
                self._sleep_sim(min(due - self._sim_now(), 0.05))
            data = self.synth.block(n)[:, self._columns]
            blocks.append(data)
            payload = Samples(rec_id, first, data).pack()
            frames.append((Msg.SAMPLES, payload))
            self._send(Msg.SAMPLES, payload, drop=index == drop_at,
                       corrupt=bool(crc_every) and index % crc_every == crc_every // 2)
            if "garbage" in self.inject and self.rng.random() < 0.1:
                self._garbage()
            if self._sim_now() >= next_status:
                self._status()
                next_status += 1.0
            if unplug_at is not None and first >= unplug_at * total:
                self._unplug_replug()
                self._recording = False
                log.info("ecg-sim: recording %d abandoned: the cable was pulled", rec_id)
                return
        if self.keep_samples:
            self.stats.sent_samples[rec_id] = np.concatenate(blocks)
        frames.append((Msg.REC_END, RecEnd(rec_id, total).pack()))
        self._recording = False
        with self._held:  # held before REC_END leaves: a fast node's answer finds what it answers
            self._pending = (rec_id, frames, time.monotonic())
        self._send(*frames[-1])
        log.info("ecg-sim: box %s recording %d sent (%d samples per lead)", self.box_id, rec_id, total)

    def _replay_pending(self) -> None:
        """Offer the unacknowledged recording again, whole, at line speed."""
        with self._held:
            if self._pending is None:
                return
            rec_id, frames, _ = self._pending
        log.info("ecg-sim: offering recording %d again", rec_id)
        for msg, payload in frames:
            if msg == Msg.REC_END:
                self._restart_ack_wait(rec_id)  # before it leaves: the ACK may come back at once
            self._send(msg, payload)
            self._stop.wait(len(payload) * 10 / self.baud / self.speed)

    def _restart_ack_wait(self, rec_id: int) -> None:
        """The ACK timeout counts from this REC_END, if the node has not ACKed ``rec_id`` meanwhile."""
        with self._held:
            if self._pending is not None and self._pending[0] == rec_id:
                self._pending = (rec_id, self._pending[1], time.monotonic())

    def _unplug_replug(self, pause: float = 1.0) -> None:
        log.info("ecg-sim: box %s unplugged", self.box_id)
        self._plugged.clear()
        with self._write:
            self.line.unplug()
        self._stop.wait(pause)
        with self._write:
            self.line.plug()
        self._plugged.set()
        log.info("ecg-sim: box %s plugged in again", self.box_id)
        self._hello()


def _nak_name(reason: int) -> str:
    try:
        return Nak(reason).name
    except ValueError:
        return str(reason)
