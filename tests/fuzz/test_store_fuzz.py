"""Mutated real-world files sent as C-STORE through real associations to a running node.

What a DR with a broken encoder, a damaged archive being re-sent, or someone on the LAN
sends: the node answers each with a DICOM status (Success or a failure with a comment)
or an abort, never hangs, never dies, stays under its memory cap, and keeps nothing
half-written (every row has its whole file, every file a row, no temp file once idle).
"""

from __future__ import annotations

import random
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, _config
from pynetdicom.association import Association

from tests.conftest import EdgeNode
from tests.fuzz import mutate
from tests.fuzz.conftest import (
    FUZZ_DICOM,
    NETWORK_TIMEOUT_S,
    Campaign,
    NodeWatch,
    peak_rss_mb,
    traceback_signature,
    tracebacks_in,
)
from tests.fuzz.seeds import Seed, build_seeds, same_length_uid

CLIENT_TIMEOUT_S = 30.0  # the sender's own DIMSE timeout: well past the node's network timeout
HANG_S = NETWORK_TIMEOUT_S + 15.0  # an answer (or abort) later than this is a hang
BATCH = 40  # cases between full checks of the node
SUCCESS = 0x0000


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> list[Seed]:
    return build_seeds(tmp_path_factory.mktemp("seeds"))


class Sender:
    """A DR-like pynetdicom sender that sends a file's dataset bytes exactly as they are."""

    def __init__(self, node: EdgeNode, seeds: list[Seed]) -> None:
        self.node = node
        self.ae = AE(ae_title="DR1")
        self.ae.acse_timeout = CLIENT_TIMEOUT_S
        self.ae.dimse_timeout = CLIENT_TIMEOUT_S
        self.ae.network_timeout = CLIENT_TIMEOUT_S
        for pair in sorted({(s.sop_class, s.transfer_syntax) for s in seeds}):
            self.ae.add_requested_context(*pair)
        self.assoc: Association | None = None

    def __enter__(self) -> Sender:
        self._previous = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True  # the bytes unparsed: pydicom would repair or refuse them
        return self

    def __exit__(self, *exc: object) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()
        _config.STORE_SEND_CHUNKED_DATASET = self._previous

    def send(self, path: Path) -> tuple[str, int | None, str]:
        """('status', code, comment) or ('abort', None, '') as the node answered."""
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self.ae.associate("127.0.0.1", self.node.port, ae_title=self.node.ae_title)
            assert self.assoc.is_established, "the node refused a good association"
        answer = self.assoc.send_c_store(path)
        if "Status" in answer:
            return "status", int(answer.Status), str(answer.get("ErrorComment", ""))
        return "abort", None, ""


def fresh_instance(seed: Seed, rng: random.Random) -> tuple[bytes, bytes]:
    """The seed's head and plain dataset with a new SOP Instance UID of the same length, so
    each accepted case is a new instance kept, not a duplicate of the last."""
    head, plain = seed.head, seed.plain_dataset()
    for old in {seed.sop_instance, seed.dataset_uid}:
        new = same_length_uid(old, rng).encode()
        head, plain = head.replace(old.encode(), new), plain.replace(old.encode(), new)
    return head, plain


def hostile_case(seed: Seed, mutator: mutate.Mutator, rng: random.Random, damage_stream: bool = False) -> tuple[bytes, str]:
    """A file for one C-STORE: the seed's file meta (pynetdicom reads it to address the
    request) and a mutated dataset. A deflated seed is sent as a well-formed deflate of the
    mutated dataset, or (``damage_stream``) with the compressed stream itself mutated."""
    head, plain = fresh_instance(seed, rng)
    if not seed.is_deflated:
        body, how = mutator.mutate(plain)
        return head + body, "+".join(how)
    if damage_stream:  # damage in the compressed stream: zlib must catch it
        body, how = mutator.mutate(mutate.deflated(plain))
        return head + body, "deflate-stream:" + "+".join(how)
    body, how = mutator.mutate(plain)
    return head + mutate.deflated(body, rng.choice((1, 6, 9))), "deflated:" + "+".join(how)


def judge(kind: str, code: int | None, comment: str, elapsed: float) -> str | None:
    """What is wrong with one answer, or None."""
    if elapsed > HANG_S:
        return f"answer took {elapsed:.1f} s (network timeout {NETWORK_TIMEOUT_S} s)"
    if kind == "abort" or code == SUCCESS:
        return None
    assert code is not None
    if 0xB000 <= code <= 0xBFFF:
        return f"warning status 0x{code:04X}: the node answers Success or a failure"
    if not comment:
        return f"failure status 0x{code:04X} without an error comment"
    return None


def fuzz_store(node: EdgeNode, seeds: list[Seed], rng: random.Random, tmp_path: Path, *, damage_stream: bool = False) -> Campaign:
    """Send mutated cases for the budget; every distinct problem is kept for the tests to judge."""
    watch = NodeWatch(node)
    mutator = mutate.Mutator(rng)
    case_file = tmp_path / "case.dcm"
    found = Campaign()
    if damage_stream:
        seeds = [s for s in seeds if s.is_deflated]
    with Sender(node, seeds) as sender:
        for seed in seeds:  # every seed as it is is kept: the harness itself is sound
            head, plain = fresh_instance(seed, rng)
            case_file.write_bytes(head + (mutate.deflated(plain) if seed.is_deflated else plain))
            assert sender.send(case_file)[:2] == ("status", SUCCESS), seed.name
        watch.check()
        watch.new_log()

        budget = mutate.Deadline(mutate.budget_s())
        while budget:
            seed = rng.choice(seeds)
            data, how = hostile_case(seed, mutator, rng, damage_stream)
            case_file.write_bytes(data)
            started = time.monotonic()
            try:
                kind, code, comment = sender.send(case_file)
            except (AttributeError, ValueError, EOFError):  # pynetdicom could not even read the file meta
                found.tally["not sent"] = found.tally.get("not sent", 0) + 1
                continue
            elapsed = time.monotonic() - started
            found.cases += 1
            key = "abort" if kind == "abort" else f"0x{code:04X}"
            found.tally[key] = found.tally.get(key, 0) + 1
            problem = judge(kind, code, comment, elapsed)
            if node.proc is not None and node.proc.poll() is not None:
                problem = f"node exited with {node.proc.returncode}"
            where = f"seed {seed.name}, mutation {how}, answered {key} {comment!r}"
            if problem is not None and problem.split(" ")[0] not in found.failures:
                saved = mutate.save_crash(f"store-{seed.name}-{found.cases}.dcm", data, f"{how}: {problem}")
                found.failures[problem.split(" ")[0]] = (f"{where}: {problem}\ninput kept at {saved} "
                                                         f"(replay: python -m tests.fuzz.replay store {saved} PORT)")
            for block in tracebacks_in(watch.new_log()):
                signature = traceback_signature(block)
                if signature not in found.tracebacks:
                    saved = mutate.save_crash(f"store-{seed.name}-{found.cases}.dcm", data, f"{how}: {block}")
                    found.tracebacks[signature] = (f"{signature}\n{where}\n{block[-1500:]}\ninput kept at {saved} "
                                                   f"(replay: python -m tests.fuzz.replay store {saved} PORT)")
            if node.proc is not None and node.proc.poll() is not None:
                break
            if found.cases % BATCH == 0:
                watch.check()
    watch.check()
    print(f"\n{found.cases} mutated C-STOREs; answers {dict(sorted(found.tally.items()))}; peak RSS {peak_rss_mb(node):.0f} MB; "
          f"{len(watch.parsed)} kept, {len(watch.undecodable)} of them with a value that does not decode; "
          f"{len(found.tracebacks)} distinct traceback(s) in the node's log")
    return found


@pytest.fixture(scope="module")
def campaign(fuzz_node: EdgeNode, seeds: list[Seed], tmp_path_factory: pytest.TempPathFactory) -> Campaign:
    print(f"\nC-STORE fuzz: EDGE_FUZZ_SEED={mutate.seed()} (budget {mutate.budget_s():.0f} s)")
    return fuzz_store(fuzz_node, seeds, random.Random(mutate.seed()), tmp_path_factory.mktemp("store-cases"))


def test_mutated_files_get_a_status_or_an_abort_and_nothing_half_kept(campaign: Campaign) -> None:
    """Checked during the run: C-ECHO answers, peak memory under the cap, rows and whole files agree, no temp files."""
    assert not campaign.failures, campaign.report(campaign.failures)
    assert campaign.cases >= 20, "the budget allowed too few cases to mean anything"
    assert any(k not in ("0x0000", "not sent") for k in campaign.tally), "no mutation was refused: the mutator is not biting"


def test_mutated_files_raise_no_uncaught_exception_in_the_node(campaign: Campaign) -> None:
    """A refusal is one log line; a traceback means the case reached code that did not expect it."""
    assert not campaign.tracebacks, campaign.report(campaign.tracebacks)


def test_damaged_deflate_streams_through_real_associations(node_factory: Any, seeds: list[Seed], fuzz_rng: random.Random, tmp_path: Path) -> None:
    node = node_factory(dicom=FUZZ_DICOM).start()
    found = fuzz_store(node, seeds, fuzz_rng, tmp_path, damage_stream=True)
    assert not found.failures and not found.tracebacks, campaign_report(found)


def campaign_report(found: Campaign) -> str:
    return found.report({**found.failures, **found.tracebacks})


def _deflate_bomb(seed: Seed, inflated_mb: int) -> bytes:
    """A small deflated C-STORE that inflates to ``inflated_mb`` MiB: one huge OB element of zeros."""
    import struct

    plain = seed.plain_dataset()
    blob = bytes(2**20)
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    element = struct.pack("<HH2sHI", 0x0009, 0x1010, b"OB", 0, inflated_mb * 2**20)
    # A private element sorts between the groups of the header; put it at the end (after
    # Pixel Data it would be out of order, so append to a dataset without trailing groups).
    parts = [packer.compress(plain), packer.compress(element)]
    parts += [packer.compress(blob) for _ in range(inflated_mb)]
    return seed.head + b"".join(parts) + packer.flush()


def test_deflate_bombs_are_refused_within_the_memory_cap(node_factory: Any, seeds: list[Seed], tmp_path: Path) -> None:
    fuzz_node = node_factory(dicom=FUZZ_DICOM).start()
    watch = NodeWatch(fuzz_node)
    seed = next(s for s in seeds if s.name == "dx.dcm-deflated")
    case_file = tmp_path / "bomb.dcm"
    with Sender(fuzz_node, seeds) as sender:
        for inflated_mb in (64, 512):
            case_file.write_bytes(_deflate_bomb(seed, inflated_mb))
            kind, code, comment = sender.send(case_file)
            assert kind == "status" and code in (0xA700, 0xC000), (
                f"{inflated_mb} MiB bomb in {case_file.stat().st_size} bytes answered {kind} {code} {comment!r}")
            watch.check()
