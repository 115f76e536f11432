"""One recording as it arrives: blocks of samples placed by index, gaps counted, not guessed."""

from __future__ import annotations

import numpy as np

from firmware_bridge.protocol import Hello, Samples

PADDING = -32768  # DICOM Waveform Padding Value: where samples never arrived
MAX_SAMPLES = 16384  # per channel, the 12-lead ECG IOD's limit


class Recording:
    """Samples of one recording from one box, in the box's units (LSB)."""

    def __init__(self, hello: Hello, rec_id: int, expected: int) -> None:
        self.hello = hello
        self.rec_id = rec_id
        self.expected = min(max(expected, 0), MAX_SAMPLES)
        self._data = np.full((max(self.expected, 1), len(hello.leads)), PADDING, dtype=np.int16)
        self._have = np.zeros(len(self._data), dtype=bool)
        self.lost_frames = 0
        self.lead_off_mask = 0
        self.dropped_beyond_limit = 0

    def add(self, block: Samples) -> None:
        """Place one SAMPLES block; a repeat overwrites, an out-of-range block is counted."""
        n, leads = block.data.shape
        if leads != self._data.shape[1]:
            return
        end = block.first + n
        if end > MAX_SAMPLES:
            self.dropped_beyond_limit += end - max(block.first, MAX_SAMPLES)
            end = MAX_SAMPLES
            n = max(end - block.first, 0)
            if n == 0:
                return
        self._grow(end)
        # -32768 is reserved for "missing": a saturated sample reads as -32767.
        self._data[block.first:end] = np.maximum(block.data[:n], -32767)
        self._have[block.first:end] = True

    def finish(self, total: int) -> tuple[np.ndarray, int]:
        """The (total, leads) samples the box says it sent, and how many of them are missing."""
        total = min(total, MAX_SAMPLES)
        self._grow(total)
        missing = int(total - np.count_nonzero(self._have[:total]))
        return self._data[:total].copy(), missing

    def _grow(self, end: int) -> None:
        if end > len(self._data):
            more = max(end, 2 * len(self._data)) - len(self._data)
            self._data = np.concatenate([self._data, np.full((more, self._data.shape[1]), PADDING, np.int16)])
            self._have = np.concatenate([self._have, np.zeros(more, bool)])

    @property
    def received(self) -> int:
        return int(np.count_nonzero(self._have))
