"""What every DICOM fuzz target checks on the running node between batches of hostile input."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.conftest import EdgeNode
from tests.edge.helpers import echo, query, spool_files, temp_files
from tests.fuzz import mutate

MEMORY_CAP_MB = 350  # issue 12: the node's peak memory while hostile input arrives
NETWORK_TIMEOUT_S = 4.0  # the node's [dicom] network_timeout_s here: a silent peer is dropped this soon
# The fuzzers talk as the clinic's DR (DR1 from loopback): a stranger gets only
# max_associations_per_host slots, and "every slot back" means all max_associations at once.
FUZZ_DICOM = {"network_timeout_s": NETWORK_TIMEOUT_S, "modality_ae": "DR1", "modality_host": "127.0.0.1"}


def peak_rss_mb(node: EdgeNode) -> float:
    """The node process's high-water resident memory (VmHWM), in MB."""
    assert node.proc is not None
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


class NodeWatch:
    """The invariants of one node under fuzzing; ``check()`` after every batch."""

    def __init__(self, node: EdgeNode) -> None:
        self.node = node
        self.parsed: set[str] = set()
        self.undecodable: list[str] = []  # kept instances with a value pydicom cannot decode
        self._log_seen = 0

    def new_log(self) -> str:
        text = self.node.log_text()
        new, self._log_seen = text[self._log_seen :], len(text)
        return new

    def alive(self) -> None:
        assert self.node.proc is not None and self.node.proc.poll() is None, (
            f"node exited with {self.node.proc.returncode if self.node.proc else '?'}:\n{self.node.log_text()[-3000:]}")

    def check(self, echo_within: float = 0.0) -> float:
        """Alive, answering C-ECHO (DCMTK), under its memory cap, nothing half-written.

        ``echo_within``: how long the node may take to answer again (slots held by peers that
        just went away come back after its timeouts); returns how long it took."""
        self.alive()
        started = time.monotonic()
        while True:
            result = echo(self.node)
            output = result.stdout + result.stderr
            if result.returncode == 0 and "Received Echo Response (Success)" in output:
                break
            assert time.monotonic() - started < echo_within, output
            time.sleep(0.25)
        waited = time.monotonic() - started
        peak = peak_rss_mb(self.node)
        assert peak < MEMORY_CAP_MB, f"node peak memory {peak:.0f} MB (cap {MEMORY_CAP_MB} MB)"
        self.kept_files_whole()
        self.no_temp_files()
        return waited

    def kept_files_whole(self) -> None:
        """Every instance row has its whole file (size and SHA-256 as acknowledged), every spool
        file a row, and every file parses as DICOM.

        A value that does not decode (a VR made up by the sender) is the sender's content, kept
        as received: it is counted in ``undecodable`` for the report, not failed here; the
        uploader must quarantine such an instance (issue 12)."""
        rows = query(self.node, "select sop_instance_uid, path, size, sha256 from instance where evicted_at is null")
        root = self.node.data_dir / "spool"
        on_disk = {p.relative_to(root).as_posix() for p in spool_files(self.node)}
        assert on_disk == {row[1] for row in rows}, "spool files and instance rows disagree"
        for uid, path, size, sha256 in rows:
            if uid in self.parsed:
                continue
            data = (root / path).read_bytes()
            assert len(data) == size and hashlib.sha256(data).hexdigest() == sha256, f"{path} is not the file acknowledged"
            ds = dcmread(root / path)
            assert path.endswith(f"/{uid}.dcm")
            try:
                for elem in ds.iterall():  # every value decodes, not just the header
                    _ = elem.value
            except Exception as exc:  # noqa: BLE001 - any decoding failure is what is counted
                self.undecodable.append(f"{uid}: {type(exc).__name__}: {exc}"[:200])
            self.parsed.add(uid)

    def no_temp_files(self, timeout: float = 10.0) -> None:
        """Once the node is idle its temp dir is empty (a streamed file is removed after the answer)."""
        deadline = time.monotonic() + timeout
        while (left := temp_files(self.node)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert left == [], f"temp files left behind: {left}"


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeNode]:
    """A node with a short network timeout, so a peer that goes silent is dropped within the run.

    One per module: a campaign runs once and several tests judge what it found."""
    node = EdgeNode(tmp_path_factory.mktemp("fuzz-node"), dicom=FUZZ_DICOM)
    try:
        yield node.start()
    finally:
        node.kill()


@dataclass
class Campaign:
    """What one fuzz run found, for the tests that judge it."""

    cases: int = 0
    tally: dict[str, int] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # wrong answers, hangs, a dead node
    tracebacks: dict[str, str] = field(default_factory=dict)  # uncaught exceptions in the node's log
    log_bytes: int = 0  # what the node wrote to its log during the campaign

    def report(self, which: dict[str, str]) -> str:
        return f"{len(which)} distinct problem(s) in {self.cases} cases:\n\n" + "\n\n".join(which.values())


def traceback_signature(block: str) -> str:
    """One line per distinct bug: the exception and the innermost frame in the project's code (else any)."""
    lines = block.splitlines()
    frames = [ln.strip() for ln in lines if ln.strip().startswith('File "')]
    own = [f for f in frames if "/site-packages/" not in f and "/lib/python3" not in f]
    error = next((ln for ln in reversed(lines) if ln and not ln.startswith(" ") and ("Error" in ln.split(":")[0] or "Exception" in ln.split(":")[0])), "?")
    return f"{error.split(':')[0]} at {(own or frames or ['?'])[-1]}"


def tracebacks_in(log: str) -> list[str]:
    """Each traceback block in new log text, up to the next log line."""
    blocks, rest = [], log
    while "Traceback (most recent call last)" in rest:
        start = rest.index("Traceback (most recent call last)")
        head = rest[:start].splitlines()[-1:] or [""]
        end = start + 1
        lines = rest[start:].splitlines(keepends=True)
        block = [lines[0]]
        for ln in lines[1:]:
            if ln[:4].isdigit() and ln[4:5] == "-":  # the next timestamped log line
                break
            block.append(ln)
        text = "".join(block)
        blocks.append(head[0] + "\n" + text)
        end = start + len(text)
        rest = rest[end:]
    return blocks


@pytest.fixture
def fuzz_rng(request: pytest.FixtureRequest) -> Any:
    """The seeded RNG of one target; the seed is printed so a failure can be replayed."""
    import random

    value = mutate.seed()
    print(f"\nfuzz seed for {request.node.name}: EDGE_FUZZ_SEED={value} (budget {mutate.budget_s():.0f} s)")
    return random.Random(value)
