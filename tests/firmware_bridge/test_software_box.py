"""The software box itself: the node's answer to a REC_END may land at any moment of the box's
main loop (the reader is its own thread), and the box must still make only the recordings it
was asked for and hold nothing the node has ACKed.

The node is played by the test: each answer is handed to the box's reader at the exact moment a
busy machine could deliver it, so the races are hit every run, not once in a CI's while.
"""

from __future__ import annotations

import threading
from typing import Any

from firmware_bridge.const import Msg, Nak
from firmware_bridge.protocol import Ack, NakMsg, RecEnd
from firmware_bridge.simulator import SoftwareBox


class SilentLine:
    """A line the box can always write to; nothing comes back but what the test hands the box."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self._closed = threading.Event()

    def plug(self) -> None: ...
    def unplug(self) -> None: ...

    def close(self) -> None:
        self._closed.set()

    def read(self, timeout: float) -> bytes:
        self._closed.wait(timeout)
        return b""

    def write(self, data: bytes, timeout: float = 1.0) -> bool:
        self.written.append(data)
        return True


class NodeOnTheLine(SoftwareBox):
    """A box whose first REC_END is answered NAK STORAGE (disk full) and whose offer after that is ACKed.

    ``ack_at``: ``"after_offer"`` hands the ACK over once the whole offer is out, before the box's
    loop looks at its button again; ``"with_rec_end"`` while its REC_END is still being sent.
    """

    def __init__(self, ack_at: str, **kwargs: Any) -> None:
        super().__init__(SilentLine(), speed=100.0, record_every=5.0, seconds=0.2, recordings=1, **kwargs)
        self.ack_at = ack_at
        self.rec_ends = 0

    def _answer(self, kind: Msg, payload: object) -> None:
        self._on_frame(kind, 0, payload)  # what the reader thread does with the node's frame

    def _send(self, msg: Msg, payload: bytes, **kwargs: Any) -> None:
        super()._send(msg, payload, **kwargs)
        if msg != Msg.REC_END:
            return
        rec_id = RecEnd.parse(payload).rec_id
        self.rec_ends += 1
        if self.rec_ends == 1:
            self._answer(Msg.NAK, NakMsg(Msg.REC_END, 0, Nak.STORAGE, rec_id))
        elif self.ack_at == "with_rec_end":
            self._answer(Msg.ACK, Ack(Msg.REC_END, 0, rec_id))

    def _replay_pending(self) -> None:
        rec_id = self.unacknowledged
        super()._replay_pending()
        if self.ack_at == "after_offer" and rec_id is not None:
            self._answer(Msg.ACK, Ack(Msg.REC_END, 0, rec_id))


def test_a_box_asked_for_one_recording_makes_one_even_when_the_ack_lands_before_it_looks_at_its_button() -> None:
    box = NodeOnTheLine("after_offer")
    stats = box.run(duration=20)
    assert stats.naks_storage == 1
    assert stats.recordings_sent == 1  # the CI flake: a second recording, {rec, rec + 1} acknowledged
    assert len(stats.recordings_acked) == 1
    assert box.unacknowledged is None


def test_an_ack_that_lands_while_the_offer_is_still_going_out_is_not_forgotten() -> None:
    box = NodeOnTheLine("with_rec_end")
    stats = box.run(duration=20)
    assert stats.naks_storage == 1 and stats.recordings_sent == 1
    assert len(stats.recordings_acked) == 1
    assert box.unacknowledged is None  # the box holds nothing the node has kept


def test_a_nak_storage_that_lands_before_rec_end_has_left_the_box_is_heard() -> None:
    """A fast node answers before the box has noted what it is waiting for: the NAK still counts."""
    box = NodeOnTheLine("after_offer")
    box.run(duration=20)
    assert box.rec_ends == 2  # the REC_END once, then the whole offer after the storage wait: no blind re-send
