"""Ingest benchmark: how fast, and in how little memory, does the node take in DR images?

Why this exists: a clinic's DR sends a handful of ~18 MB images per patient, and the node
runs on a 1-2 GB box. The product goals are that our C-STORE receiver is at least 1.5x as
fast as DCMTK ``storescp +B`` (the "just write the bytes" baseline), at least 3x as fast as
Orthanc, and stays under 100 MB peak RSS while 4 associations send at once. This script
measures exactly that, in one run, against real peers, with the same sender (DCMTK
``storescu``) and the same maximum PDU for every receiver.

Run:  .venv/bin/python bench/ingest.py [--count 50] [--concurrency 4] [--repeat 1] [--nagle]

DCMTK (as built for Debian) leaves Nagle's algorithm on unless ``TCP_NODELAY=1`` is in its
environment; with it on, every C-STORE of a big image stalls ~40-80 ms on Nagle plus
delayed ACK, the sender becomes the bottleneck and every receiver measures ~300 MB/s. So
by default the DCMTK programs (storescu, storescp, Orthanc, which links DCMTK) run with
``TCP_NODELAY=1`` and the figures are the receivers'; ``--nagle`` measures the stock
behaviour instead.

It needs root (for a private network namespace; it falls back to loopback without one),
DCMTK (/usr/bin/storescu, storescp, echoscu) and Orthanc (/usr/sbin/Orthanc). It prints
figures; it exits non-zero only when a receiver failed to receive every file (or could not
be run at all), never because a goal was missed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from common import (
    DX_COLS,
    DX_ROWS,
    EDGE,
    ORTHANC,
    BenchError,
    abort_status,
    dx_dataset,
    edge_studies,
    interrupt_on_sigterm,
    log_tail,
    netns_add,
    netns_delete,
    netns_exec,
    run_cmd,
    spawn,
    spawn_orthanc,
    stop,
    write_edge_toml,
)
from tests.node import free_port  # the checkout is on sys.path once common is imported; no pytest there

STORESCU = "/usr/bin/storescu"  # DCMTK; the bare names on PATH may be pynetdicom's apps
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
CALLING_AET = "BENCHSCU"
SAMPLE_EVERY_S = 0.05
START_TIMEOUT_S = 60.0

GOAL_VS_STORESCP = 1.5
GOAL_VS_ORTHANC = 3.0
GOAL_RSS_MB = 100.0


# --------------------------------------------------------------------------- images


def generate_images(out_dir: Path, count: int) -> list[Path]:
    """Write ``count`` DX images (3000x3000, 16-bit, explicit VR LE) sharing one pixel buffer."""
    rng = np.random.default_rng(1)
    ramp = np.add.outer(np.arange(DX_ROWS), np.arange(DX_COLS)).astype(np.uint16) * 5
    pixels = (ramp + rng.integers(0, 512, size=(DX_ROWS, DX_COLS), dtype=np.uint16)).tobytes()
    study_uid, series_uid = generate_uid(), generate_uid()
    paths = []
    for i in range(count):
        path = out_dir / f"dx{i:04d}.dcm"
        ds = dx_dataset(pixels, study_uid, series_uid, i + 1, patient_name="Bench^Ingest", patient_id="BENCH0001",
                        accession="BENCH1", study_id="1", bits_stored=16)  # fmt: skip
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- network


class Network:
    """A private network namespace (only ``lo``), or plain loopback if one cannot be made."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.note = ""

    def open(self) -> None:
        name = f"edgebench{os.getpid()}"
        try:
            netns_add(name)
        except BenchError as exc:
            self.note = (
                f"network namespace unavailable ({exc}); FELL BACK to host loopback "
                "(storescp and Orthanc listen on all interfaces during their runs)"
            )
            return
        self.name = name
        self.note = f"all receivers and senders ran inside network namespace {name} (loopback only)"

    def close(self) -> None:
        if self.name is not None:
            netns_delete(self.name)
            self.name = None

    def prefix(self) -> list[str]:
        """Command prefix that runs a program inside the namespace (``ip netns exec`` execs in place)."""
        return netns_exec(self.name) if self.name else []


# --------------------------------------------------------------------------- processes


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, from /proc/PID/task/*/children."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


def _status_kb(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0])
    except (OSError, ValueError):
        pass
    return values


class RssSampler:
    """Peak memory of a receiver's process tree: VmHWM per process, VmRSS summed every 50 ms.

    The launched command may be a wrapper (``ip netns exec``, a console script, a forking
    server), so the whole tree under the launched PID is watched. For a single-process
    receiver the figure is its exact VmHWM; for ``storescp --fork`` it is the largest sampled
    sum over parent and children (shared pages counted in each, so an upper bound).
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.hwm_kb: dict[int, int] = {}
        self.tree_peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _sample(self) -> None:
        total = 0
        for pid in _tree(self.pid):
            status = _status_kb(pid)
            total += status.get("VmRSS", 0)
            if "VmHWM" in status:
                self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), status["VmHWM"])
        self.tree_peak_kb = max(self.tree_peak_kb, total)

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            self._sample()

    def finish(self) -> float:
        """Stop sampling (after a last sample) and return the peak in MB."""
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()
        return max(self.tree_peak_kb, max(self.hwm_kb.values(), default=0)) / 1024


# --------------------------------------------------------------------------- receivers


@dataclass
class Receiver:
    """How to start one kind of receiver and count what it received."""

    name: str
    aet: str
    start: Callable[[Path, int], subprocess.Popen[bytes]]  # (work dir, DICOM port) -> process
    count: Callable[[Path], int]  # (work dir) -> instances received


def edge_receiver(net: Network, max_pdu: int, concurrency: int) -> Receiver:
    def start(work: Path, port: int) -> subprocess.Popen[bytes]:
        config = work / "edge.toml"
        write_edge_toml(config, {
            "node": {"id": "bench-0001"},
            # The sender is the clinic's DR, as configured on a real node: a stranger would get only
            # max_associations_per_host (2) of the concurrent associations.
            "dicom": {"ae_title": "EDGE", "bind_address": "127.0.0.1", "port": port,
                      "max_pdu_bytes": max_pdu, "max_associations": max(8, concurrency + 1),
                      "modality_ae": CALLING_AET, "modality_host": "127.0.0.1"},
            "storage": {"data_dir": str(work / "data"), "min_free_mb": 0},
            "console": {"bind_address": "127.0.0.1", "port": free_port()},
            "kiosk": {"port": free_port()},
            "cloud": {"dicomweb_url": "http://127.0.0.1:9/dicom-web"},
        })  # fmt: skip
        return spawn([*net.prefix(), str(EDGE), "--config", str(config), "serve", "dicom"], work / "receiver.log")

    def count(work: Path) -> int:
        return sum(int(study["instances"]) for study in edge_studies(work / "edge.toml"))

    return Receiver("edge (ours)", "EDGE", start, count)


def storescp_receiver(net: Network, max_pdu: int, fork: bool) -> Receiver:
    def start(work: Path, port: int) -> subprocess.Popen[bytes]:
        out = work / "out"
        out.mkdir()
        cmd = [*net.prefix(), STORESCP, "+B", "--max-pdu", str(max_pdu), "-od", str(out), "-aet", "STORESCP"]
        return spawn([*cmd, *(["--fork"] if fork else []), str(port)], work / "receiver.log")

    def count(work: Path) -> int:
        return sum(1 for p in (work / "out").rglob("*") if p.is_file())

    return Receiver("storescp +B" + (" --fork" if fork else ""), "STORESCP", start, count)


def orthanc_receiver(net: Network, max_pdu: int) -> Receiver:
    http_port = free_port()

    def start(work: Path, port: int) -> subprocess.Popen[bytes]:
        config = {
            "Name": "bench",
            "StorageDirectory": str(work / "storage"),
            "IndexDirectory": str(work / "storage"),
            "Plugins": [],
            "DicomServerEnabled": True,
            "DicomAet": "ORTHANC",
            "DicomPort": port,
            "DicomCheckCalledAet": False,
            "MaximumPduLength": max_pdu,
            "HttpServerEnabled": True,
            "HttpPort": http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
        }
        return spawn_orthanc(net.prefix(), work, config, work / "receiver.log")

    def count(work: Path) -> int:
        url = f"http://127.0.0.1:{http_port}/statistics"
        out = run_cmd([*net.prefix(), "curl", "-sf", "--max-time", "20", url], timeout=30).stdout
        return int(json.loads(out)["CountInstances"])

    return Receiver("Orthanc", "ORTHANC", start, count)


# --------------------------------------------------------------------------- sending


def wait_ready(net: Network, proc: subprocess.Popen[bytes], port: int, aet: str) -> None:
    """Wait until the receiver answers a C-ECHO (bounded), or fail if it died."""
    deadline = time.monotonic() + START_TIMEOUT_S
    cmd = [*net.prefix(), ECHOSCU, "-aet", CALLING_AET, "-aec", aet, "-to", "2", "127.0.0.1", str(port)]
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"receiver exited with code {proc.returncode} before it was ready")
        if subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0:
            return
        time.sleep(0.2)
    raise BenchError(f"receiver did not answer C-ECHO within {START_TIMEOUT_S:.0f} s")


def storescu_cmd(net: Network, port: int, aet: str, files: Sequence[Path], max_pdu: int) -> list[str]:
    timeouts = ["-to", "30", "-ta", "30", "-td", "120", "-ts", "120"]
    return [
        *net.prefix(), STORESCU, "-aet", CALLING_AET, "-aec", aet, "--max-pdu", str(max_pdu),
        *timeouts, "127.0.0.1", str(port), *map(str, files),
    ]  # fmt: skip


def send(net: Network, port: int, aet: str, batches: Sequence[Sequence[Path]], max_pdu: int, work: Path) -> float:
    """Run one storescu per batch, all at once; return wall seconds until the last one exits."""
    timeout = 120 + 10 * max(len(b) for b in batches)  # generous: >= 2 MB/s per image
    t0 = time.monotonic()
    procs = [
        spawn(storescu_cmd(net, port, aet, batch, max_pdu), work / f"storescu{i}.log")
        for i, batch in enumerate(batches)
    ]
    try:
        for proc in procs:
            remaining = timeout - (time.monotonic() - t0)
            try:
                proc.wait(timeout=max(remaining, 1))
            except subprocess.TimeoutExpired:
                raise BenchError(f"storescu did not finish within {timeout} s") from None
        seconds = time.monotonic() - t0
    finally:
        for proc in procs:
            stop(proc)
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
        print(f"  warning: storescu exited non-zero for batch(es) {failed}; see counts below", file=sys.stderr)
    return seconds


# --------------------------------------------------------------------------- one measurement


@dataclass
class Result:
    """One receiver in one phase; with --repeat, the median run's speed and the worst RSS."""

    receiver: str
    phase: str
    associations: int
    seconds: float = 0.0
    mb_per_s: float = 0.0
    peak_rss_mb: float = 0.0
    received: int = 0
    expected: int = 0
    error: str = ""
    notes: list[str] = field(default_factory=list)
    mb_per_s_runs: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.error and self.received == self.expected


def measure(
    receiver: Receiver, net: Network, files: Sequence[Path], batches: int, max_pdu: int, root: Path, phase: str
) -> Result:
    """Start a fresh receiver, send ``files`` over ``batches`` concurrent associations, measure, stop."""
    result = Result(receiver.name, phase, min(batches, len(files)), expected=len(files))
    work = Path(tempfile.mkdtemp(prefix=f"{phase}-", dir=root))
    port = free_port()
    total_mb = sum(p.stat().st_size for p in files) / 1e6
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc = receiver.start(work, port)
        wait_ready(net, proc, port, receiver.aet)
        sampler = RssSampler(proc.pid)
        sampler.start()
        os.sync()  # no writeback left over from the previous receiver during this run
        try:
            result.seconds = send(net, port, receiver.aet, _split(files, batches), max_pdu, work)
        finally:
            result.peak_rss_mb = sampler.finish()
        result.mb_per_s = total_mb / result.seconds
        result.received = receiver.count(work)
        if proc.poll() is not None:
            result.error = f"receiver exited with code {proc.returncode} during the run"
    except (BenchError, OSError, ValueError, KeyError) as exc:
        result.error = str(exc)
    finally:
        if proc is not None:
            stop(proc)
        if not result.ok:
            result.notes.append(_log_tail(work))
        shutil.rmtree(work, ignore_errors=True)
    return result


def combine(runs: Sequence[Result]) -> Result:
    """Median seconds (so MB/s) over the runs, highest peak RSS, fewest files received."""
    first = runs[0]
    ok_runs = [r for r in runs if r.ok and r.seconds > 0] or [first]
    seconds = statistics.median(r.seconds for r in ok_runs)
    megabytes = first.mb_per_s * first.seconds
    failed = [r for r in runs if not r.ok]
    return Result(
        first.receiver,
        first.phase,
        first.associations,
        seconds=seconds,
        mb_per_s=megabytes / seconds if seconds else 0.0,
        peak_rss_mb=max(r.peak_rss_mb for r in runs),
        received=min(r.received for r in runs),
        expected=first.expected,
        error="; ".join(r.error for r in failed if r.error),
        notes=[n for r in failed for n in r.notes],
        mb_per_s_runs=[r.mb_per_s for r in runs],
    )


def _split(files: Sequence[Path], n: int) -> list[list[Path]]:
    n = max(1, min(n, len(files)))
    return [list(files[i::n]) for i in range(n)]


def _log_tail(work: Path) -> str:
    """The tails of every log in a run's work dir: the receiver's and each storescu's."""
    return "\n".join(tail for log in sorted(work.glob("*.log")) if (tail := log_tail(log)))


# --------------------------------------------------------------------------- report


def print_results(results: Sequence[Result]) -> None:
    ours = {r.phase: r for r in results if r.receiver.startswith("edge")}
    print()
    print(f"{'phase':11} {'receiver':22} {'assocs':>6} {'files':>9} {'seconds':>8} {'MB/s':>8} {'ours/x':>7} "
          f"{'peak RSS MB':>12}  MB/s of each run")  # fmt: skip
    for r in results:
        ref = ours.get(r.phase)
        ratio = f"{ref.mb_per_s / r.mb_per_s:.2f}x" if ref and ref.ok and r.ok and r.mb_per_s else "-"
        files = f"{r.received}/{r.expected}"
        print(
            f"{r.phase:11} {r.receiver:22} {r.associations:>6} {files:>9} {r.seconds:>8.2f} "
            f"{r.mb_per_s:>8.1f} {ratio:>7} {r.peak_rss_mb:>12.1f}  {' '.join(f'{v:.0f}' for v in r.mb_per_s_runs)}"
        )
    for r in results:
        if not r.ok:
            print(f"\nFAILED: {r.receiver} ({r.phase}): {r.error or f'received {r.received} of {r.expected}'}")
            for note in r.notes:
                print(note)


def goal_line(results: Sequence[Result]) -> str:
    def find(phase: str, prefix: str) -> Result | None:
        return next((r for r in results if r.phase == phase and r.receiver.startswith(prefix) and r.ok), None)

    ours, scp, orthanc = find("single", "edge"), find("single", "storescp"), find("single", "Orthanc")
    conc = find("concurrent", "edge")
    parts, met = [], True
    for other, goal, label in ((scp, GOAL_VS_STORESCP, "storescp +B"), (orthanc, GOAL_VS_ORTHANC, "Orthanc")):
        if ours is None or other is None:
            parts.append(f"vs {label}: not measured")
            met = False
            continue
        ratio = ours.mb_per_s / other.mb_per_s
        ok = ratio >= goal
        met &= ok
        parts.append(f"{ratio:.2f}x {label} (goal >= {goal}x: {'met' if ok else 'MISSED'})")
    if conc is None:
        parts.append("RSS under concurrency: not measured")
        met = False
    else:
        ok = conc.peak_rss_mb < GOAL_RSS_MB
        met &= ok
        parts.append(
            f"peak RSS {conc.peak_rss_mb:.0f} MB with {conc.associations} associations "
            f"(goal < {GOAL_RSS_MB:.0f} MB: {'met' if ok else 'MISSED'})"
        )
    return f"GOALS {'MET' if met else 'NOT MET'}: ours " + "; ".join(parts)


# --------------------------------------------------------------------------- main


def check_tools() -> None:
    missing = [t for t in (STORESCU, STORESCP, ECHOSCU, ORTHANC, str(EDGE)) if not os.access(t, os.X_OK)]
    if shutil.which("curl") is None:
        missing.append("curl")
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=50, help="number of ~18 MB DX images (default 50)")
    parser.add_argument("--concurrency", type=int, default=4, help="storescu processes in phase 2 (default 4)")
    parser.add_argument("--max-pdu", type=int, default=131072, help="max PDU for every receiver, 4096..131072 (DCMTK's limit)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per receiver; the table shows the median (default 1)")
    parser.add_argument("--nagle", action="store_true", help="leave Nagle on in DCMTK (its stock behaviour; see above)")
    parser.add_argument("--tmp", type=Path, default=None, help="parent of the temp dir (default: system temp)")
    args = parser.parse_args(argv)
    if min(args.count, args.concurrency, args.repeat) < 1 or not 4096 <= args.max_pdu <= 131072:
        parser.error("--count, --concurrency and --repeat must be >= 1; --max-pdu 4096..131072")
    return args


def run(args: argparse.Namespace, root: Path, net: Network) -> list[Result]:
    t0 = time.monotonic()
    images = root / "images"
    images.mkdir()
    files = generate_images(images, args.count)
    total_mb = sum(p.stat().st_size for p in files) / 1e6
    print(f"generated {len(files)} DX images, {total_mb / len(files):.1f} MB each, {total_mb:.0f} MB total, "
          f"in {time.monotonic() - t0:.1f} s")  # fmt: skip
    nagle = "Nagle on (DCMTK stock)" if args.nagle else "TCP_NODELAY=1 for DCMTK programs"
    print(f"max PDU {args.max_pdu} bytes for every receiver; sender DCMTK storescu; {nagle}; {net.note}")
    plan = [
        (edge_receiver(net, args.max_pdu, args.concurrency), 1, "single"),
        (storescp_receiver(net, args.max_pdu, fork=False), 1, "single"),
        (orthanc_receiver(net, args.max_pdu), 1, "single"),
        (edge_receiver(net, args.max_pdu, args.concurrency), args.concurrency, "concurrent"),
        (storescp_receiver(net, args.max_pdu, fork=True), args.concurrency, "concurrent"),
    ]
    runs: list[list[Result]] = [[] for _ in plan]
    for n in range(args.repeat):  # receivers interleaved, so drift on the box hits them alike
        for (receiver, batches, phase), done in zip(plan, runs):
            label = f"run {n + 1}/{args.repeat} " if args.repeat > 1 else ""
            print(f"  {label}{phase:10} -> {receiver.name} over {min(batches, len(files))} association(s) ...", flush=True)
            result = measure(receiver, net, files, batches, args.max_pdu, root, phase)
            status = "ok" if result.ok else "FAILED"
            print(f"     {result.received}/{result.expected} received, {result.seconds:.2f} s, "
                  f"{result.mb_per_s:.1f} MB/s, peak RSS {result.peak_rss_mb:.1f} MB: {status}", flush=True)  # fmt: skip
            done.append(result)
    return [combine(done) for done in runs]


@contextmanager
def workspace(parent: Path | None) -> Iterator[tuple[Path, Network]]:
    root = Path(tempfile.mkdtemp(prefix="edge-ingest-bench-", dir=parent))
    net = Network()
    try:
        net.open()
        yield root, net
    finally:
        net.close()
        shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    interrupt_on_sigterm()
    # Inherited by every DCMTK program started below (storescu, storescp, echoscu, Orthanc).
    os.environ["TCP_NODELAY"] = "0" if args.nagle else "1"
    try:
        check_tools()
        with workspace(args.tmp) as (root, net):
            results = run(args, root, net)
    except (BenchError, KeyboardInterrupt) as exc:
        return abort_status(exc)
    print_results(results)
    print()
    print(goal_line(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
