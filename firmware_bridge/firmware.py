"""Box firmware updates from the node (``edge ecg-firmware PORT IMAGE``).

Stop-and-wait over the same framing: every step is ACKed or NAKed; a chunk the box could
not read is sent again; a verification failure is rolled back so the box keeps running its
old firmware. The box only switches after COMMIT.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import serial

from edge.terminal import printable
from firmware_bridge.const import FW_CHUNK, Msg, Nak
from firmware_bridge.protocol import (
    Ack,
    FrameDecoder,
    FwBegin,
    FwChunk,
    Hello,
    LeadSetRefused,
    NakMsg,
    SeqCounter,
    encode_frame,
    host_hello,
    parse,
)

log = logging.getLogger(__name__)

IMAGE_MAGIC = b"CEFW"
MAX_IMAGE = 4 * 2**20
STEP_TIMEOUT_S = 2.0
RETRIES = 8


class FirmwareError(Exception):
    """The update did not happen; the message says why and what the box runs now."""


def build_image(version: str, body: bytes) -> bytes:
    """A firmware image: magic, header version, the firmware version string, then the body."""
    raw = version.encode("ascii")
    return IMAGE_MAGIC + bytes([1, len(raw)]) + raw + body


def image_version(image: bytes) -> str:
    """The firmware version an image carries; raises FirmwareError if it is not an image."""
    if len(image) < 6 or image[:4] != IMAGE_MAGIC or image[4] != 1 or len(image) < 6 + image[5]:
        raise FirmwareError("not a box firmware image (no CEFW header)")
    version = image[6 : 6 + image[5]].decode("ascii", "replace")
    if not version.isprintable():  # the box would announce it in HELLO, and the bridge would refuse the box
        raise FirmwareError(f"image version {printable(version)} is not a printable name; the box is left as it is")
    return version


@dataclass
class UpdateResult:
    box_id: str
    old_version: str
    new_version: str
    resent_chunks: int


class _Link:
    """A blocking request/answer channel over the port."""

    def __init__(self, port: serial.Serial) -> None:
        self.port = port
        self.decoder = FrameDecoder()
        self.seq = SeqCounter()

    def send(self, msg: Msg, payload: bytes = b"") -> int:
        seq = self.seq.next()
        self.port.write(encode_frame(msg, seq, payload))
        return seq

    def wait(self, accept: Callable[[int, object], bool], timeout: float) -> object | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = self.port.read(self.port.in_waiting or 1)
            for frame in self.decoder.feed(data):
                if frame is None:
                    continue
                try:
                    msg = parse(frame)
                except LeadSetRefused as exc:  # no use for recordings, but new firmware may be its cure
                    msg = exc.hello
                except ValueError:
                    continue
                if accept(frame.type, msg):
                    return msg
        return None

    def request(self, msg: Msg, payload: bytes = b"", arg: int | None = None) -> Ack | NakMsg | None:
        """Send and wait for the ACK/NAK that refers to it; None after a timeout."""
        seq = self.send(msg, payload)

        def answer(kind: int, m: object) -> bool:
            if isinstance(m, Ack) and m.ref_type == msg and (arg is None or m.arg == arg):
                return True
            return isinstance(m, NakMsg) and (m.ref_type == msg and m.ref_seq == seq or m.reason == Nak.BAD_FRAME)

        return self.wait(answer, STEP_TIMEOUT_S)  # type: ignore[return-value]


def update_firmware(port_name: str, image: bytes, baud: int = 115200) -> UpdateResult:
    """Send ``image`` to the box on ``port_name`` and switch it over; raises FirmwareError."""
    new_version = image_version(image)
    if len(image) > MAX_IMAGE:
        raise FirmwareError(f"image is {len(image)} bytes; a box takes at most {MAX_IMAGE}")
    try:
        port = serial.Serial(port_name, baud, timeout=0.1, write_timeout=5, exclusive=True)
    except (serial.SerialException, OSError) as exc:
        raise FirmwareError(
            f"cannot open {port_name}: {exc} (if the bridge is using it, stop `edge serve bridge` first)"
        ) from None
    with port:
        link = _Link(port)
        hello = _hello(link)
        log.info("firmware: box %s on %s runs %s; sending %s (%d bytes)", hello.box_id, port_name,
                 hello.fw_version, new_version, len(image))
        _step(link, hello, Msg.FW_BEGIN, FwBegin(len(image), hashlib.sha256(image).digest()).pack())
        resent = 0
        offset = 0
        budget = RETRIES * (len(image) // FW_CHUNK + 2)  # chunk requests in all: a box rewinding for ever is given up on
        while offset < len(image):
            chunk = image[offset : offset + FW_CHUNK]
            budget -= 1
            if budget < 0:
                _rollback(link, hello, f"the box kept asking for chunks again ({resent} resent)")
            for _ in range(RETRIES):
                answer = link.request(Msg.FW_CHUNK, FwChunk(offset, chunk).pack(), arg=offset)
                if isinstance(answer, Ack):
                    offset += len(chunk)
                    break
                resent += 1
                if isinstance(answer, NakMsg) and answer.reason == Nak.BAD_OFFSET:
                    if answer.arg > len(image):
                        _rollback(link, hello, f"the box asked for offset {answer.arg}, past the {len(image)}-byte image")
                    offset = answer.arg
                    break
                log.info("firmware: box %s: chunk at %d %s; sending it again", hello.box_id, offset,
                         "garbled on the line" if answer else "not answered")
            else:
                _rollback(link, hello, f"chunk at offset {offset} failed {RETRIES} times")
        _step(link, hello, Msg.FW_END)
        verify = _request_retrying(link, Msg.FW_VERIFY)
        if not isinstance(verify, Ack):
            reason = "SHA-256 mismatch" if isinstance(verify, NakMsg) and verify.reason == Nak.HASH_MISMATCH else "no answer"
            _rollback(link, hello, f"verification failed ({reason})")
        _step(link, hello, Msg.FW_COMMIT)
        after = link.wait(lambda kind, m: isinstance(m, Hello), 10.0)
        if not isinstance(after, Hello) or after.fw_version != new_version:
            raise FirmwareError(f"box {hello.box_id} did not come back on {new_version} after commit "
                                f"(reports {after.fw_version if isinstance(after, Hello) else 'nothing'})")
        log.info("firmware: box %s now runs %s (%d chunk(s) sent again)", hello.box_id, new_version, resent)
        return UpdateResult(hello.box_id, hello.fw_version, new_version, resent)


def _hello(link: _Link) -> Hello:
    for _ in range(3):
        link.send(Msg.HOST_HELLO, host_hello())
        hello = link.wait(lambda kind, m: isinstance(m, Hello), STEP_TIMEOUT_S)
        if isinstance(hello, Hello):
            return hello
    raise FirmwareError("no box answered on the port (is it plugged in and on?)")


def _request_retrying(link: _Link, msg: Msg, payload: bytes = b"") -> Ack | NakMsg | None:
    answer = None
    for _ in range(RETRIES):
        answer = link.request(msg, payload)
        if answer is not None and not (isinstance(answer, NakMsg) and answer.reason == Nak.BAD_FRAME):
            return answer
    return answer


def _step(link: _Link, hello: Hello, msg: Msg, payload: bytes = b"") -> None:
    answer = _request_retrying(link, msg, payload)
    if isinstance(answer, Ack):
        return
    if isinstance(answer, NakMsg) and answer.reason == Nak.BUSY:
        raise FirmwareError(f"box {hello.box_id} is recording; try again when it is done (still on {hello.fw_version})")
    why = f"refused ({Nak(answer.reason).name})" if isinstance(answer, NakMsg) and answer.reason in Nak._value2member_map_ else "no answer"
    if msg in (Msg.FW_BEGIN,):
        raise FirmwareError(f"box {hello.box_id} {why} the update; it stays on {hello.fw_version}")
    _rollback(link, hello, f"{msg.name} {why}")


def _rollback(link: _Link, hello: Hello, why: str) -> None:
    answer = _request_retrying(link, Msg.FW_ROLLBACK)
    state = "rolled back" if isinstance(answer, Ack) else "rollback not confirmed"
    log.warning("firmware: box %s: %s; %s, box stays on %s", hello.box_id, why, state, hello.fw_version)
    raise FirmwareError(f"{why}; {state}: box {hello.box_id} stays on firmware {hello.fw_version}")
