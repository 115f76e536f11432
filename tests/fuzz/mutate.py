"""The fuzz harness's own parts: a time budget, a seeded byte mutator, and a place for crashing inputs.

Deterministic by default (``EDGE_FUZZ_SEED``, default 12), so a CI failure is reproducible
from the seed it prints; ``EDGE_FUZZ_SECONDS`` sets the budget per target for long runs
by hand (docs/FUZZING.md).
"""

from __future__ import annotations

import os
import random
import struct
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

DEFAULT_SECONDS = 20.0  # per target; four targets keep tests/fuzz/ within about two minutes
DEFAULT_SEED = 12


def budget_s() -> float:
    """Seconds each fuzz target may spend generating inputs (``EDGE_FUZZ_SECONDS``)."""
    return float(os.environ.get("EDGE_FUZZ_SECONDS", DEFAULT_SECONDS))


def seed() -> int:
    """The RNG seed (``EDGE_FUZZ_SEED``); ``random`` draws a fresh one, printed with any failure."""
    value = os.environ.get("EDGE_FUZZ_SEED", str(DEFAULT_SEED))
    return random.SystemRandom().randrange(2**32) if value == "random" else int(value)


def crash_dir() -> Path:
    """Where failing inputs are kept (``EDGE_FUZZ_CRASH_DIR``, else a fresh temp dir)."""
    configured = os.environ.get("EDGE_FUZZ_CRASH_DIR")
    if configured:
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return Path(tempfile.mkdtemp(prefix="edge-fuzz-"))


def save_crash(name: str, data: bytes, why: str) -> Path:
    """Keep one input that broke something, with a note of why, and return its path."""
    where = crash_dir()
    path = where / name
    path.write_bytes(data)
    path.with_suffix(path.suffix + ".txt").write_text(why + "\n")
    return path


class Deadline:
    """The budget of one target: ``while budget: ...`` until time is up."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def __bool__(self) -> bool:
        return time.monotonic() < self.end


# Interesting values for length fields: the edges where parsers go wrong.
_LENGTHS = (0, 1, 2, 3, 4, 7, 8, 0x7F, 0x80, 0xFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFF0, 0xFFFFFFFE, 0xFFFFFFFF)
_VRS = (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UL", b"US", b"FD", b"DS", b"IS", b"PN", b"UI", b"AT", b"OF", b"LO", b"\x00\x00", b"ZZ")


class Mutator:
    """Byte-level and DICOM-aware mutations of a seed, drawn from one seeded RNG."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.strategies: list[Callable[[bytes], bytes]] = [
            self.bit_flips, self.byte_set, self.truncate, self.splice, self.duplicate_chunk,
            self.delete_chunk, self.length_field, self.vr_change, self.insert_garbage,
            self.tag_swap,
        ]

    def mutate(self, data: bytes, rounds: int | None = None) -> tuple[bytes, list[str]]:
        """One to three stacked mutations; returns the bytes and the names of what was done."""
        done = []
        for _ in range(rounds or self.rng.choice((1, 1, 2, 3))):
            strategy = self.rng.choice(self.strategies)
            data = strategy(data) if data else data
            done.append(strategy.__name__)
        return data, done

    def _pos(self, data: bytes) -> int:
        return self.rng.randrange(len(data))

    def bit_flips(self, data: bytes) -> bytes:
        out = bytearray(data)
        for _ in range(self.rng.randint(1, 8)):
            i = self._pos(data)
            out[i] ^= 1 << self.rng.randrange(8)
        return bytes(out)

    def byte_set(self, data: bytes) -> bytes:
        out = bytearray(data)
        for _ in range(self.rng.randint(1, 4)):
            out[self._pos(data)] = self.rng.choice((0x00, 0xFF, 0x7F, 0x80, self.rng.randrange(256)))
        return bytes(out)

    def truncate(self, data: bytes) -> bytes:
        return data[: self._pos(data)]

    def splice(self, data: bytes) -> bytes:
        """Two pieces of the same file glued at random points (a resent or torn transfer)."""
        a, b = sorted((self._pos(data), self._pos(data)))
        return data[:a] + data[b:] + data[a:b]

    def duplicate_chunk(self, data: bytes) -> bytes:
        a = self._pos(data)
        n = self.rng.randint(1, min(4096, len(data) - a))
        return data[: a + n] + data[a : a + n] + data[a + n :]

    def delete_chunk(self, data: bytes) -> bytes:
        a = self._pos(data)
        return data[:a] + data[a + self.rng.randint(1, 64) :]

    def insert_garbage(self, data: bytes) -> bytes:
        a = self._pos(data)
        return data[:a] + self.rng.randbytes(self.rng.randint(1, 256)) + data[a:]

    def length_field(self, data: bytes) -> bytes:
        """Overwrite a 2- or 4-byte little-endian word with an edge value: a DICOM length, very likely."""
        if len(data) < 8:
            return data
        i = self.rng.randrange(0, len(data) - 4) & ~1  # elements start on even offsets
        value = self.rng.choice(_LENGTHS)
        if self.rng.random() < 0.5:
            return data[:i] + struct.pack("<I", value & 0xFFFFFFFF) + data[i + 4 :]
        return data[:i] + struct.pack("<H", value & 0xFFFF) + data[i + 2 :]

    def vr_change(self, data: bytes) -> bytes:
        """Replace the VR of a real element (found by its two-letter code) with another."""
        candidates = [i for i in range(4, min(len(data) - 2, 8192), 2) if data[i : i + 2].isalpha() and data[i : i + 2].isupper()]
        if not candidates:
            return data
        i = self.rng.choice(candidates)
        return data[:i] + self.rng.choice(_VRS) + data[i + 2 :]

    def tag_swap(self, data: bytes) -> bytes:
        """Move an element header to another place: tags out of order, sequences closed early."""
        if len(data) < 16:
            return data
        i = self.rng.randrange(0, len(data) - 8) & ~1
        j = self.rng.randrange(0, len(data) - 8) & ~1
        head = data[i : i + 8]
        out = bytearray(data)
        out[j : j + 8] = head
        return bytes(out)


def deflated(dataset: bytes, level: int = 6) -> bytes:
    """Raw deflate, as the Deflated Explicit VR Little Endian transfer syntax carries a dataset."""
    packer = zlib.compressobj(level, zlib.DEFLATED, -15)
    return packer.compress(dataset) + packer.flush()
