"""One box on one serial port: read frames, keep recordings, survive garbage and unplugging."""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import logging
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import serial
import serial_asyncio
from peewee import DatabaseError

from edge.store.spool import (
    InstanceHeader,
    KeptInstance,
    RejectedInstance,
    Spool,
    is_out_of_space,
    keep_instance,
    read_header,
)
from edge.store.walk import DecodeLimits
from firmware_bridge import boxes
from firmware_bridge.config import BridgeSection
from firmware_bridge.const import PROTOCOL_VERSION, Msg, Nak
from firmware_bridge.ecg_dicom import EcgContext, MissingLeads, build_ecg, write_ecg
from firmware_bridge.protocol import (
    Ack,
    Frame,
    FrameDecoder,
    Hello,
    LeadSetRefused,
    NakMsg,
    ProtocolError,
    RecEnd,
    RecStart,
    Samples,
    SeqCounter,
    Status,
    encode_frame,
    host_hello,
    lead_mask,
    missing_leads,
    parse,
    seq_gap,
)
from firmware_bridge.recording import Recording

log = logging.getLogger(__name__)

STATUS_WRITE_EVERY_S = 10.0  # unchanged STATUS is written this seldom (SD-card wear)
DB_ERROR_LOG_EVERY_S = 60.0  # a full disk fails bookkeeping writes again and again: say so this seldom
BAD_INPUT_LOG_EVERY_S = 60.0  # a box sending bad messages by the thousand gets one log line this often
REFUSED_REMEMBERED = 64  # recordings answered NAK UNSUPPORTED that a re-offer is refused again without a rebuild


class PortGone(Exception):
    """The port closed under us (unplugged)."""


class NotKept(Exception):
    """A finished recording the node cannot keep now (disk full): the box is told NAK STORAGE."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NeverKept(Exception):
    """A finished recording the node will never accept as it is (over the ``[storage]`` decode
    limits, malformed): the box is told NAK UNSUPPORTED. NAK STORAGE would have it offer the
    same recording every 30 s for ever."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class SessionStats:
    """Counters for tests, the benchmark and the log."""

    connects: int = 0
    frames: int = 0
    crc_errors: int = 0
    garbage: int = 0
    lost_frames: int = 0
    bytes: int = 0
    kept: list[str] = field(default_factory=list)  # SOP Instance UIDs
    interrupted: int = 0
    not_kept: int = 0  # finished recordings answered NAK STORAGE (the box keeps them)
    bad_messages: int = 0  # well-framed but unparseable messages (ignored; HELLO answered NAK UNSUPPORTED)
    hellos_refused: int = 0  # HELLOs answered NAK UNSUPPORTED (a lead set that cannot make a 12-lead ECG, …)
    refused_recordings: int = 0  # REC_ENDs answered NAK UNSUPPORTED: never storable, the box must not resend


class BoxSession:
    """The bridge's side of one port, for as long as the bridge runs; reconnects by itself."""

    def __init__(
        self,
        port: str,
        settings: BridgeSection,
        spool: Spool,
        institution: str = "",
        station: str = "",
        on_kept: Callable[[KeptInstance], None] | None = None,
        *,
        min_free_mb: int = 0,
        make_room: Callable[[], object] | None = None,
        limits: DecodeLimits | None = None,
    ) -> None:
        """``min_free_mb``: ``[storage] min_free_mb``; under it a recording is refused (NAK STORAGE)
        after ``make_room`` (retention: evict what the cloud holds) has been tried, as for a C-STORE.
        ``limits``: the ``[storage]`` decode limits a recording is kept under, as a C-STORE is."""
        self.port = port
        self.settings = settings
        self.spool = spool
        self.institution = institution
        self.station = station
        self.on_kept = on_kept
        self.min_free_mb = min_free_mb
        self.make_room = make_room
        self.limits = limits
        self._db_error_logged: float | None = None  # when a failed bookkeeping write was last logged
        self.stats = SessionStats()
        self.hello: Hello | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._seq = SeqCounter()
        self._last_seq: int | None = None
        self._recording: Recording | None = None
        self._rec_started: dt.datetime | None = None
        self._status_written: tuple[float, tuple[int, int, bool]] | None = None
        self._version_warned = False
        self._lead_off = 0
        self._refused: bytes | None = None  # the last HELLO refused; cleared by a good one, silence or a replug
        self._refused_box = ""  # its box id, when it had one
        self._bad_input_logged: dict[str, float] = {}  # kind of bad input -> when last logged
        self._refused_recordings: OrderedDict[tuple[str, int], str] = OrderedDict()  # (box, rec_id) -> reason

    async def run(self) -> None:
        """Open, talk, and on any loss of the port wait (backing off) and open again."""
        delay = self.settings.reconnect_min_s
        waiting_logged = False
        while True:
            try:
                reader, writer = await serial_asyncio.open_serial_connection(
                    url=self.port, baudrate=self.settings.baud, exclusive=True
                )
            except (serial.SerialException, OSError, ValueError) as exc:
                if not waiting_logged:
                    log.info("bridge: waiting for a box on %s (%s)", self.port, _reason(exc))
                    waiting_logged = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.reconnect_max_s)
                continue
            waiting_logged = False
            self.stats.connects += 1
            log.info("bridge: port %s open", self.port)
            started = time.monotonic()
            try:
                await self._talk(reader, writer)
            except (PortGone, serial.SerialException, OSError, ConnectionError) as exc:
                log.warning("bridge: port %s lost (%s); reconnecting", self.port, _reason(exc))
            except Exception:  # a bug must not end the session for good: the box stays served
                log.exception("bridge: unexpected error on %s; reopening the port", self.port)
            finally:
                self._writer = None
                writer.close()
                await self._disconnected()
            if time.monotonic() - started > 10:
                delay = self.settings.reconnect_min_s
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.reconnect_max_s)

    async def _talk(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        decoder = FrameDecoder()
        self._last_seq = None
        self._send(Msg.HOST_HELLO, host_hello())
        while True:
            try:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel
                async with asyncio.timeout(self.settings.silence_s):
                    data = await reader.read(4096)
            except TimeoutError:
                await self._silent()
                continue
            if not data:
                raise PortGone("end of file")
            self.stats.bytes += len(data)
            for frame in decoder.feed(data):
                if frame is not None:
                    await self._on_frame(frame)
            self.stats.crc_errors, self.stats.garbage = decoder.stats.crc_errors, decoder.stats.garbage

    def _send(self, msg: Msg, payload: bytes) -> None:
        if self._writer is not None:
            self._writer.write(encode_frame(msg, self._seq.next(), payload))

    async def _silent(self) -> None:
        """Nothing for ``silence_s``: the box may be off or restarted; ask it who it is."""
        if self._recording is not None:
            await self._interrupt("box fell silent")
        if self.hello is not None:
            log.info("bridge: box %s on %s silent for %.0f s", self.hello.box_id, self.port, self.settings.silence_s)
            await self._note("the box's state", boxes.note_disconnected, self.hello.box_id)
            self.hello = None
        self._refused = None  # another box may be on the port now
        self._send(Msg.HOST_HELLO, host_hello())

    async def _on_frame(self, frame: Frame) -> None:
        if frame.version != PROTOCOL_VERSION:
            if not self._version_warned:
                log.warning("bridge: box on %s speaks protocol v%d, this bridge v%d: update the %s",
                            self.port, frame.version, PROTOCOL_VERSION,
                            "node" if frame.version > PROTOCOL_VERSION else "box's firmware")
                self._version_warned = True
            return
        self.stats.frames += 1
        lost = 0 if frame.type == Msg.HELLO else seq_gap(self._last_seq, frame.seq)  # a restart renumbers
        self._last_seq = frame.seq
        if lost:
            self.stats.lost_frames += lost
            if self._recording is not None:
                self._recording.lost_frames += lost
        try:
            msg = parse(frame)
        except ProtocolError as exc:
            if frame.type == Msg.HELLO:
                await self._refuse_hello(frame, exc)
            else:
                self.stats.bad_messages += 1
                self._log_bad_input("message", "bridge: bad message from %s: %s", self.port, exc)
            return
        if isinstance(msg, Hello):
            await self._on_hello(msg)
        elif self.hello is None:
            if frame.type == Msg.STATUS and self._refused is None:  # a box that was there before we opened: ask
                self._send(Msg.HOST_HELLO, host_hello())  # (a refused box would only say the same HELLO again)
            elif frame.type == Msg.REC_END and self._refused is not None:  # recorded with the refused lead set
                self.stats.refused_recordings += 1
                self._log_bad_input("refused recording", "bridge: box %s recording %d on %s refused: the box's HELLO "
                                    "was refused; answered NAK UNSUPPORTED", self._refused_box or "?",
                                    msg.rec_id, self.port)  # type: ignore[attr-defined]
                self._send(Msg.NAK, NakMsg(frame.type, frame.seq, Nak.UNSUPPORTED, msg.rec_id).pack())  # type: ignore[attr-defined]
            elif frame.type == Msg.REC_END:
                self._send(Msg.NAK, NakMsg(frame.type, frame.seq, Nak.BAD_STATE, msg.rec_id).pack())  # type: ignore[attr-defined]
        elif isinstance(msg, Status):
            await self._on_status(msg)
        elif isinstance(msg, Samples):
            if self._recording is not None and msg.rec_id == self._recording.rec_id:
                self._recording.add(msg)
        elif isinstance(msg, RecStart):
            await self._on_rec_start(msg)
        elif isinstance(msg, RecEnd):
            await self._on_rec_end(frame, msg)

    async def _refuse_hello(self, frame: Frame, exc: ProtocolError) -> None:
        """NAK UNSUPPORTED (arg: the missing leads' bitmask) and forget the box until a good HELLO.

        One log line per distinct HELLO: a refused box that keeps saying the same is not news.
        """
        self.stats.hellos_refused += 1
        if self._recording is not None:
            await self._interrupt("box restarted with a HELLO the bridge refused")
        if self.hello is not None:
            await self._note("the box's state", boxes.note_disconnected, self.hello.box_id)
            self.hello = None
        missing = exc.missing if isinstance(exc, LeadSetRefused) else ()
        if frame.payload != self._refused:
            if isinstance(exc, LeadSetRefused):
                log.error("bridge: box %s on %s refused: its lead set lacks %s, so no 12-lead ECG can be made; "
                          "answered NAK UNSUPPORTED (fix the box's lead set or firmware)",
                          exc.box_id, self.port, ", ".join(missing))
            else:
                log.error("bridge: box on %s refused: %s; answered NAK UNSUPPORTED", self.port, exc)
        self._refused = frame.payload
        self._refused_box = exc.box_id if isinstance(exc, LeadSetRefused) else ""
        self._send(Msg.NAK, NakMsg(frame.type, frame.seq, Nak.UNSUPPORTED, lead_mask(missing)).pack())

    def _log_bad_input(self, kind: str, line: str, *args: object) -> None:
        """A warning per kind of bad input at most every ``BAD_INPUT_LOG_EVERY_S`` (a hostile box floods)."""
        now = time.monotonic()
        last = self._bad_input_logged.get(kind)
        if last is None or now - last >= BAD_INPUT_LOG_EVERY_S:
            self._bad_input_logged[kind] = now
            log.warning(line, *args)

    async def _on_hello(self, hello: Hello) -> None:
        self._refused = None
        if self._recording is not None:
            await self._interrupt("box restarted")
        changed = self.hello is None or self.hello != hello
        self.hello = hello
        self._status_written = None
        await self._note("the box's state", boxes.note_hello, self.port, hello)
        if changed:
            log.info("bridge: box %s on %s: model %s, firmware %s, %d leads at %d Hz, %.3g uV/LSB",
                     hello.box_id, self.port, hello.model, hello.fw_version, len(hello.leads),
                     hello.sample_rate, hello.nv_per_lsb / 1000)

    async def _on_status(self, status: Status) -> None:
        assert self.hello is not None
        self._lead_off = status.lead_off
        recording = self._recording is not None
        if recording:
            self._recording.lead_off_mask |= status.lead_off  # type: ignore[union-attr]
        key = (status.battery_pct, status.lead_off, recording)
        now = time.monotonic()
        if self._status_written and self._status_written[1] == key and now - self._status_written[0] < STATUS_WRITE_EVERY_S:
            return
        lead_off_changed = not self._status_written or self._status_written[1][1] != status.lead_off
        if lead_off_changed and status.lead_off:
            log.info("bridge: box %s lead-off: %s", self.hello.box_id, boxes.lead_off_names(status.lead_off))
        self._status_written = (now, key)
        await self._note("the box's state", boxes.note_status, self.hello.box_id, status, recording)

    async def _on_rec_start(self, start: RecStart) -> None:
        assert self.hello is not None
        if self._recording is not None:
            await self._interrupt("a new recording started before the last one ended")
        self._recording = Recording(self.hello, start.rec_id, start.expected)
        self._recording.lead_off_mask = self._lead_off  # as the last STATUS said
        self._rec_started = dt.datetime.now()
        await self._note("the recording's start", boxes.recording_started, self.hello.box_id, start.rec_id)
        log.info("bridge: box %s recording %d started (%d samples expected)", self.hello.box_id, start.rec_id, start.expected)

    async def _interrupt(self, why: str) -> None:
        rec, self._recording = self._recording, None
        if rec is None or self.hello is None:
            return
        self.stats.interrupted += 1
        log.warning("bridge: box %s recording %d interrupted (%s) after %d samples", self.hello.box_id, rec.rec_id, why, rec.received)
        await self._note(
            "the recording's state", boxes.recording_finished, self.hello.box_id, rec.rec_id, "interrupted",
            samples=rec.received, lost_frames=rec.lost_frames, detail=why,
        )

    async def _on_rec_end(self, frame: Frame, end: RecEnd) -> None:
        assert self.hello is not None
        rec = self._recording
        refused = self._refused_recordings.get((self.hello.box_id, end.rec_id))
        if refused is not None:  # offered again after NAK UNSUPPORTED (a box that did not listen): the same answer
            self.stats.refused_recordings += 1
            if rec is not None and rec.rec_id == end.rec_id:  # resent whole: its row was reopened
                self._recording = None
                await self._note("the recording's state", boxes.recording_finished, self.hello.box_id, rec.rec_id,
                                 "failed", samples=rec.received, lost_frames=rec.lost_frames, detail=refused)
            self._send(Msg.NAK, NakMsg(frame.type, frame.seq, Nak.UNSUPPORTED, end.rec_id).pack())
            return
        if rec is None or rec.rec_id != end.rec_id:
            known = await asyncio.to_thread(_already_kept, self.hello.box_id, end.rec_id)
            if known:  # our ACK was lost: say it again
                self._send(Msg.ACK, Ack(frame.type, frame.seq, end.rec_id).pack())
            else:  # we missed its start: the box offers the whole recording again
                self._send(Msg.NAK, NakMsg(frame.type, frame.seq, Nak.BAD_STATE, end.rec_id).pack())
            return
        self._recording = None
        box_id = self.hello.box_id
        missing = missing_leads(rec.hello.leads)
        try:
            if missing:  # HELLO.parse refuses such a box; should one get here, no retry can help
                raise MissingLeads(missing)
            kept = await asyncio.to_thread(self._keep, rec, end)
        except (MissingLeads, NeverKept) as exc:  # never storable: NAK STORAGE would have the box offer it for ever
            reason = exc.reason if isinstance(exc, NeverKept) else str(exc)
            self.stats.refused_recordings += 1
            self._refused_recordings[(box_id, rec.rec_id)] = reason
            while len(self._refused_recordings) > REFUSED_REMEMBERED:
                self._refused_recordings.popitem(last=False)
            log.error("bridge: box %s recording %d refused: %s; answered NAK UNSUPPORTED: the box is not to offer "
                      "it again", box_id, rec.rec_id, reason)
            await self._note("the recording's state", boxes.recording_finished, box_id, rec.rec_id, "failed",
                             samples=rec.received, lost_frames=rec.lost_frames, detail=reason)
            self._send(Msg.NAK, NakMsg(frame.type, frame.seq, Nak.UNSUPPORTED, end.rec_id).pack())
            return
        except Exception as exc:  # whatever it was, the box must hear it and keep the recording
            reason = _not_kept_reason(exc)
            line = "bridge: box %s recording %d not kept: %s; answered NAK STORAGE: the box keeps it and offers it again"
            if isinstance(exc, (NotKept, RejectedInstance, OSError, DatabaseError)):
                log.error(line, box_id, rec.rec_id, reason)  # a full or failing disk: one line, no traceback
            else:
                log.exception(line, box_id, rec.rec_id, reason)  # a bug
            self.stats.not_kept += 1
            await self._note("the recording's state", boxes.recording_finished, box_id, rec.rec_id, "failed",
                             samples=rec.received, lost_frames=rec.lost_frames, detail=reason)
            self._send(Msg.NAK, NakMsg(frame.type, frame.seq, Nak.STORAGE, end.rec_id).pack())
            return
        self._send(Msg.ACK, Ack(frame.type, frame.seq, end.rec_id).pack())
        self.stats.kept.append(kept.sop_instance_uid)
        if self.on_kept is not None and not kept.duplicate:
            self.on_kept(kept)

    def _keep(self, rec: Recording, end: RecEnd) -> KeptInstance:
        """DICOM file in the spool's tmp, then the durable path; only then may the box be told."""
        hello = self.hello
        assert hello is not None
        done = _kept_uid(hello.box_id, rec.rec_id)
        if done is not None:  # offered again after our ACK was lost: same UID, nothing new
            log.info("bridge: box %s recording %d already kept as %s", hello.box_id, rec.rec_id, done[0])
            return KeptInstance(done[0], done[1], duplicate=True)
        self._ensure_room(hello.box_id, rec.rec_id)
        samples, missing = rec.finish(end.total)
        order = boxes.armed_order(hello.box_id)
        lead_off = boxes.lead_off_names(rec.lead_off_mask)
        ctx = EcgContext(hello, rec.rec_id, self._rec_started or dt.datetime.now(), order,
                         self.institution, self.station, missing, lead_off)
        ds = build_ecg(ctx, samples)
        fd, name = tempfile.mkstemp(prefix="ecg-", suffix=".dcm", dir=self.spool.tmp)
        os.close(fd)
        path = Path(name)
        try:
            write_ecg(ds, path)
            header = _header_within_limits(path, self.limits)
            kept = keep_instance(self.spool, path, calling_aet="", source="ecg", header=header, limits=self.limits)
        finally:
            try:  # gone already once kept (renamed into the spool); half-written otherwise
                path.unlink(missing_ok=True)
            except OSError as exc:  # start-up reconciliation removes it at the latest
                log.warning("bridge: could not remove temp file %s: %s", path, _reason(exc))
        boxes.recording_finished(
            hello.box_id, rec.rec_id, "kept", consumed_arming=order.arming_id if order else None,
            sop_instance_uid=kept.sop_instance_uid, samples=len(samples), missing_samples=missing,
            damaged=missing > 0, lost_frames=rec.lost_frames, matched=order is not None,
            patient_id=order.patient_id if order else "", accession_number=order.accession_number if order else "",
            lead_off=lead_off,
        )
        log.info(
            "bridge: box %s recording %d kept as %s (%d samples%s, %s)",
            hello.box_id, rec.rec_id, kept.sop_instance_uid, len(samples),
            f", {missing} missing: marked damaged" if missing else "",
            f"accession {order.accession_number or '-'}" if order else "unmatched",
        )
        return kept

    def _ensure_room(self, box_id: str, rec_id: int) -> None:
        """As for a C-STORE: under ``min_free_mb``, evict what the cloud holds, then refuse if still short."""
        if self.spool.free_mb() >= self.min_free_mb:
            return
        if self.make_room is not None:
            try:
                self.make_room()
            except (OSError, DatabaseError) as exc:
                log.error("bridge: could not free disk space for box %s recording %d: %s", box_id, rec_id,
                          _storage_reason(exc))
            except Exception:
                log.exception("bridge: could not free disk space for box %s recording %d", box_id, rec_id)
        free = self.spool.free_mb()
        if free < self.min_free_mb:
            raise NotKept(f"disk almost full ({free:.0f} MB free, minimum {self.min_free_mb} MB)")

    async def _note(self, what: str, write: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        """Bookkeeping in the database; a full or failing disk must not end the session.

        One log line per ``DB_ERROR_LOG_EVERY_S`` at most: on a full disk some writes still
        fit in SQLite's journal and others do not, so failures come and go.
        """
        try:
            await asyncio.to_thread(write, *args, **kwargs)
        except (DatabaseError, OSError) as exc:
            now = time.monotonic()
            if self._db_error_logged is None or now - self._db_error_logged >= DB_ERROR_LOG_EVERY_S:
                log.error("bridge: could not write %s for %s to the database (%s); carrying on",
                          what, self.port, _storage_reason(exc))
                self._db_error_logged = now
            return False
        return True

    async def _disconnected(self) -> None:
        self._refused = None
        if self._recording is not None:
            await self._interrupt("port lost")
        if self.hello is not None:
            await self._note("the box's state", boxes.note_disconnected, self.hello.box_id)
            self.hello = None


def _header_within_limits(path: Path, limits: DecodeLimits | None) -> InstanceHeader:
    """keep_instance's own header check, done first so that its refusals can be told apart.

    What the file *is* (over the decode limits, malformed, a bad UID) will not change however
    often the box offers it: NeverKept, NAK UNSUPPORTED. keep_instance answers a disk that is
    full with the same 0xA700 as an instance over the limits, so it is handed this header and
    whatever it still raises is the disk's doing: NAK STORAGE, offered again later.
    """
    try:
        return read_header(path, limits)
    except RejectedInstance as exc:
        if isinstance(exc.__context__, OSError):  # could not read back what we just wrote: the disk, not the ECG
            raise
        raise NeverKept(exc.reason) from None


def _already_kept(box_id: str, rec_id: int) -> bool:
    from firmware_bridge.tables import EcgRecording

    return EcgRecording.select().where(
        EcgRecording.box_id == box_id, EcgRecording.rec_id == rec_id, EcgRecording.state == "kept"
    ).exists()


def _kept_uid(box_id: str, rec_id: int) -> tuple[str, str] | None:
    from edge.store.models import Instance
    from firmware_bridge.tables import EcgRecording

    row = EcgRecording.get_or_none(
        EcgRecording.box_id == box_id, EcgRecording.rec_id == rec_id, EcgRecording.state == "kept")
    if row is None:
        return None
    inst = Instance.get_or_none(Instance.sop_instance_uid == row.sop_instance_uid)
    return row.sop_instance_uid, inst.study.study_instance_uid if inst else ""


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _storage_reason(exc: BaseException) -> str:
    """What went wrong writing, in words (``write_transaction`` already surfaces SQLite's own cause)."""
    if is_out_of_space(exc):
        return f"disk full ({getattr(exc, 'strerror', None) or exc})"
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}" + (f" ({errno.errorcode.get(exc.errno, exc.errno)})" if exc.errno else "")
    return str(exc) or type(exc).__name__


def _not_kept_reason(exc: BaseException) -> str:
    if isinstance(exc, (NotKept, RejectedInstance)):
        return exc.reason
    if isinstance(exc, (OSError, DatabaseError)):
        return f"could not write it: {_storage_reason(exc)}"
    return f"{type(exc).__name__}: {exc}"
