"""The framing a firmware team implements from PROTOCOL.md: check values and resync."""

from __future__ import annotations

import numpy as np

from firmware_bridge.const import Msg
from firmware_bridge.protocol import (
    FrameDecoder,
    Hello,
    Samples,
    crc16,
    encode_frame,
    parse,
    seq_gap,
)


def test_crc_is_ccitt_false_with_the_documented_check_value() -> None:
    assert crc16(b"123456789") == 0x29B1


def test_decoder_resyncs_after_garbage_and_a_bad_crc_without_losing_the_next_frame() -> None:
    block = Samples(7, 25, np.arange(200, dtype=np.int16).reshape(25, 8))
    good = encode_frame(Msg.SAMPLES, 2, block.pack())
    damaged = bytearray(encode_frame(Msg.SAMPLES, 1, block.pack()))
    damaged[100] ^= 0x01
    decoder = FrameDecoder()
    frames = decoder.feed(b"\x13\x37garbage" + bytes(damaged) + b"\xff\xfe" + good)
    kept = [f for f in frames if f is not None]
    assert len(kept) == 1 and kept[0].seq == 2
    assert np.array_equal(parse(kept[0]).data, block.data)  # type: ignore[attr-defined]
    assert decoder.stats.crc_errors + decoder.stats.garbage >= 2


def test_newer_hello_with_appended_fields_still_parses() -> None:
    hello = Hello("ECG-1", "CE-ECG8", "1.2.0", 500, 2500, minor=3)
    assert Hello.parse(hello.pack() + b"\x01\x02future") == hello
    assert seq_gap(65535, 1) == 1 and seq_gap(5, 6) == 0 and seq_gap(None, 9) == 0
