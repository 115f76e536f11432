"""Upload benchmark: how much of a slow clinic uplink does the node's sync service use?

Why this exists: a clinic's uplink is slow (a few Mbit/s, ~100 ms away from the regional
cloud) and a DR study is tens of MB. The product goals are that the sync service, sending
uncompressed, keeps the link at least 90 % busy with useful bytes (goodput), and that with
lossless compression (JPEG-LS) it moves DICOM at least 2x as fast as uncompressed. This
script measures that in one run, against a real Orthanc with its DICOMweb plugin, next to
the simplest possible sender (one ``curl`` STOW-RS per instance).

Run:  .venv/bin/python bench/upload.py [--count 12] [--rate-mbit 10] [--delay-ms 50] [--loss 0]

The link: two private network namespaces ("clinic" and "cloud") joined by a veth pair.
The clinic side's egress is shaped with ``tc tbf`` to the link rate. This kernel has no
netem, so the delay is a small userspace TCP proxy in the cloud namespace in front of
Orthanc that holds every chunk ``--delay-ms`` in each direction (so a request/answer
round trip costs 2x that); it also counts the bytes that cross it. ``--loss`` drops that
percentage of the clinic's outgoing packets with nftables (``numgen random``).

Phases, each against a fresh Orthanc and a fresh delay proxy, on the same images:
  1. curl: one ``curl`` STOW-RS per instance, sequential, prebuilt multipart bodies;
  2. edge sync, ``[sync] compress = "none"``;
  3. edge sync, ``[sync] compress = "jpeg-ls"``.
For the node, the data dir is pre-filled (``keep_instance``, as a C-STORE would) before
``edge serve sync`` starts; the time runs from its start until ``edge studies --json``
shows every study ``synced``.

It needs root (namespaces, tc, nft), iproute2, curl, Orthanc with the DICOMweb plugin.
It exits non-zero only when a phase could not be run or Orthanc did not get every
instance, never because a goal was missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    DX_COLS,
    DX_ROWS,
    EDGE,
    ORTHANC,
    REPO,
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

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

CLINIC_IP = "10.231.0.1"
CLOUD_IP = "10.231.0.2"
ORTHANC_PORT = 8042  # inside the cloud namespace, loopback clients only
PROXY_PORT = 8080  # the delay proxy on the cloud side of the link
BOUNDARY = "edge-bench-upload-boundary"

GOAL_GOODPUT = 0.90
GOAL_COMPRESSED_SPEEDUP = 2.0
START_TIMEOUT_S = 30.0
POLL_S = 0.5


# --------------------------------------------------------------------------- images


def generate_images(out_dir: Path, count: int, per_study: int, noise: float) -> list[Path]:
    """``count`` DX images, 3000x3000, 12 bits stored in 16: smooth anatomy-like content plus noise.

    Every image has its own content (a shifted, scaled field and fresh noise), so a
    compressor cannot profit from repeats; ``per_study`` images share a study.
    """
    import numpy as np
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(7)
    y = np.linspace(-1.0, 1.0, DX_ROWS, dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, DX_COLS, dtype=np.float32)[None, :]
    paths: list[Path] = []
    study_uid = series_uid = ""
    for i in range(count):
        if i % per_study == 0:
            study_uid, series_uid = generate_uid(), generate_uid()
        dx, dy, s = rng.uniform(-0.1, 0.1), rng.uniform(-0.1, 0.1), rng.uniform(0.9, 1.1)
        xx, yy = (x - dx) * s, (y - dy) * s
        body = 2600.0 * np.exp(-((xx / 0.95) ** 8 + (yy / 1.05) ** 8))  # the patient against air
        lungs = 1100.0 * (np.exp(-(((xx + 0.38) / 0.26) ** 2 + ((yy + 0.05) / 0.55) ** 2))
                          + np.exp(-(((xx - 0.38) / 0.26) ** 2 + ((yy + 0.05) / 0.55) ** 2)))
        ribs = 120.0 * np.cos(18.0 * yy + 3.0 * xx * xx) * (lungs > 200)
        spine = 700.0 * np.exp(-((xx / 0.08) ** 2))
        field_ = 300.0 + body - lungs + ribs + spine + 80.0 * np.cos(2.0 * xx + 1.5 * yy)
        field_ += rng.normal(0.0, noise, size=(DX_ROWS, DX_COLS)).astype(np.float32)
        pixels = np.clip(field_, 0, 4095).astype(np.uint16)
        path = out_dir / f"dx{i:03d}.dcm"
        study = i // per_study + 1
        ds = dx_dataset(pixels.tobytes(), study_uid, series_uid, i + 1, patient_name=f"Bench^Upload{study}",
                        patient_id=f"BENCHUP{study:04d}", accession=f"BENCHUP{study}", study_id=str(study),
                        bits_stored=12)  # fmt: skip
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def multipart_head() -> bytes:
    return f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")


def multipart_tail() -> bytes:
    return f"\r\n--{BOUNDARY}--\r\n".encode("ascii")


def build_bodies(files: Sequence[Path], out_dir: Path) -> list[Path]:
    """One single-part STOW-RS body per file, for curl (streamed to disk, not built in memory)."""
    bodies = []
    for path in files:
        body = out_dir / (path.stem + ".body")
        with open(body, "wb") as out, open(path, "rb") as src:
            out.write(multipart_head())
            shutil.copyfileobj(src, out, 1024 * 1024)
            out.write(multipart_tail())
        bodies.append(body)
    return bodies


# --------------------------------------------------------------------------- the link


class Link:
    """Two private namespaces joined by a veth pair; the clinic's egress shaped by tbf (and nft loss)."""

    def __init__(self, rate_mbit: float, loss_pct: float) -> None:
        tag = os.getpid()
        self.clinic = f"edgeup-clinic-{tag}"
        self.cloud = f"edgeup-cloud-{tag}"
        self.clinic_dev = f"eupc{tag}"[:15]
        self.cloud_dev = f"eupk{tag}"[:15]
        self.rate_mbit = rate_mbit
        self.loss_pct = loss_pct
        self._made: list[str] = []

    def open(self) -> None:
        for ns in (self.clinic, self.cloud):
            netns_add(ns)
            self._made.append(ns)
        run_cmd(["ip", "link", "add", self.clinic_dev, "netns", self.clinic, "type", "veth",
                 "peer", "name", self.cloud_dev, "netns", self.cloud], timeout=10)  # fmt: skip
        for ns, dev, ip in ((self.clinic, self.clinic_dev, CLINIC_IP), (self.cloud, self.cloud_dev, CLOUD_IP)):
            run_cmd(["ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev], timeout=10)
            run_cmd(["ip", "-n", ns, "link", "set", dev, "up"], timeout=10)
        # One TCP segment per packet on the clinic side, as on a real uplink: so --loss drops
        # segments, not 64 KB GSO bursts (tbf would split those anyway).
        run_cmd(["ip", "-n", self.clinic, "link", "set", self.clinic_dev, "gso_max_segs", "1"], timeout=10)
        # The rate limit on the sending side.
        run_cmd(["ip", "netns", "exec", self.clinic, "tc", "qdisc", "add", "dev", self.clinic_dev, "root",
                 "tbf", "rate", f"{self.rate_mbit}mbit", "burst", "32kbit", "latency", "400ms"], timeout=10)  # fmt: skip
        if self.loss_pct > 0:
            self._add_loss()

    def _add_loss(self) -> None:
        if shutil.which("nft") is None:
            raise BenchError("--loss needs nftables: apt-get install nftables")
        per_10k = max(1, round(self.loss_pct * 100))
        script = (
            "table inet edgeup_loss {\n"
            "  chain out { type filter hook postrouting priority 0; policy accept;\n"
            f"    oifname \"{self.clinic_dev}\" numgen random mod 10000 < {per_10k} counter drop\n"
            "  }\n}\n"
        )
        proc = subprocess.run(["ip", "netns", "exec", self.clinic, "nft", "-f", "-"], input=script,
                              capture_output=True, text=True, timeout=10)
        if proc.returncode != 0:
            raise BenchError(f"nft loss rule failed: {proc.stderr.strip()[-300:]}")

    def close(self) -> None:
        for ns in reversed(self._made):  # deleting a namespace deletes its veth end, and so the pair
            netns_delete(ns)
        self._made.clear()

    def in_clinic(self) -> list[str]:
        return netns_exec(self.clinic)

    def in_cloud(self) -> list[str]:
        return netns_exec(self.cloud)

    def link_bytes(self) -> int:
        """Bytes the shaper has sent so far (frames incl. Ethernet/IP/TCP headers)."""
        out = run_cmd([*self.in_clinic(), "tc", "-s", "-j", "qdisc", "show", "dev", self.clinic_dev], timeout=10).stdout
        for qdisc in json.loads(out):
            if qdisc.get("kind") == "tbf":
                return int(qdisc.get("bytes", 0))
        return 0

    def dropped_packets(self) -> int:
        """Packets the --loss rule has dropped so far (0 without --loss)."""
        if self.loss_pct <= 0:
            return 0
        out = run_cmd([*self.in_clinic(), "nft", "-j", "list", "table", "inet", "edgeup_loss"], timeout=10).stdout
        for item in json.loads(out).get("nftables", []):
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    return int(expr["counter"]["packets"])
        return 0

    @property
    def rate_bytes_per_s(self) -> float:
        return self.rate_mbit * 1e6 / 8


# --------------------------------------------------------------------------- delay proxy (runs in the cloud namespace)


class _Stats:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.up = 0  # client -> cloud payload bytes (HTTP requests incl. multipart framing)
        self.down = 0
        self.connections = 0
        self.requests: dict[str, int] = {}
        self.last_up_at = 0.0
        self.last_down_at = 0.0
        self.dirty = True

    def write(self) -> None:
        data = {"up": self.up, "down": self.down, "connections": self.connections, "requests": self.requests,
                "last_up_at": self.last_up_at, "last_down_at": self.last_down_at}  # fmt: skip
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)
        self.dirty = False


class _RequestCounter:
    """Counts HTTP requests (method + first path segments) in one connection's client stream."""

    def __init__(self, stats: _Stats) -> None:
        self.stats = stats
        self.buffer = b""
        self.skip = 0
        self.lost = False

    def feed(self, data: bytes) -> None:
        while data and not self.lost:
            if self.skip:
                used = min(self.skip, len(data))
                self.skip -= used
                data = data[used:]
                continue
            self.buffer += data
            data = b""
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > 65536:
                    self.lost = True
                return
            head, rest = self.buffer[:end].decode("latin-1"), self.buffer[end + 4:]
            self.buffer = b""
            lines = head.split("\r\n")
            parts = lines[0].split(" ")
            method, target = (parts[0], parts[1]) if len(parts) >= 2 else ("?", "?")
            key = method + " " + "/".join(target.split("?")[0].split("/")[:3])
            self.stats.requests[key] = self.stats.requests.get(key, 0) + 1
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip() or 0)
                elif name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
                    self.lost = True  # not followed; requests after this one on the connection are not counted
            self.skip = length
            data = rest


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, stats: _Stats,
                upstream: bool) -> None:  # fmt: skip
    """Copy one direction, each chunk held ``delay`` seconds (pipelined: throughput is kept)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=256)
    counter = _RequestCounter(stats) if upstream else None

    async def read() -> None:
        try:
            while chunk := await reader.read(65536):
                if upstream:
                    stats.up += len(chunk)
                    stats.last_up_at = time.time()
                    assert counter is not None
                    counter.feed(chunk)
                else:
                    stats.down += len(chunk)
                    stats.last_down_at = time.time()
                stats.dirty = True
                await queue.put((loop.time() + delay, chunk))
        except (ConnectionError, OSError):
            pass
        await queue.put((loop.time() + delay, b""))

    async def write() -> None:
        while True:
            due, chunk = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not chunk:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(chunk)
            await writer.drain()

    tasks = [asyncio.create_task(read()), asyncio.create_task(write())]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


async def _delay_proxy(listen: str, upstream: str, delay_ms: float, stats_path: Path) -> None:
    stats = _Stats(stats_path)
    stats.write()
    delay = delay_ms / 1000.0
    up_host, up_port = upstream.rsplit(":", 1)

    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        stats.connections += 1
        stats.dirty = True
        try:
            u_reader, u_writer = await asyncio.open_connection(up_host, int(up_port))
        except OSError:
            c_writer.transport.abort()
            return
        try:
            await asyncio.gather(_pump(c_reader, u_writer, delay, stats, True),
                                 _pump(u_reader, c_writer, delay, stats, False))  # fmt: skip
        except (ConnectionError, OSError):
            pass
        finally:
            for w in (c_writer, u_writer):
                w.transport.abort()

    host, port = listen.rsplit(":", 1)
    server = await asyncio.start_server(handle, host, int(port))
    stop_event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_event.set)
    async with server:
        while not stop_event.is_set():
            if stats.dirty:
                stats.write()
            try:
                await asyncio.wait_for(stop_event.wait(), 0.1)
            except TimeoutError:
                pass
    stats.write()


# --------------------------------------------------------------------------- the cloud


class Cloud:
    """Orthanc (DICOMweb) plus the delay proxy in the cloud namespace; fresh for every phase."""

    def __init__(self, link: Link, work: Path, delay_ms: float) -> None:
        self.link = link
        self.work = work
        self.delay_ms = delay_ms
        self.stats_path = work / "proxy-stats.json"
        self.orthanc: subprocess.Popen[bytes] | None = None
        self.proxy: subprocess.Popen[bytes] | None = None

    @property
    def dicomweb_url(self) -> str:
        """What the clinic side uses: through the link and the delay proxy."""
        return f"http://{CLOUD_IP}:{PROXY_PORT}/dicom-web"

    def start(self) -> None:
        storage = self.work / "orthanc-storage"
        config = {
            "Name": "bench-cloud",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpServerEnabled": True,
            "HttpPort": ORTHANC_PORT,
            # Only the delay proxy (loopback in this namespace) talks to Orthanc, so the
            # clinic cannot bypass the delay by going to port 8042 directly.
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "SaveJobs": False,
            "HttpTimeout": 600,
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False,
                         "Host": f"{CLOUD_IP}:{PROXY_PORT}", "Ssl": False},  # fmt: skip
        }
        self.orthanc = spawn_orthanc(self.link.in_cloud(), self.work, config, self.work / "orthanc.log")
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.orthanc.poll() is not None:
                raise BenchError(f"Orthanc exited with {self.orthanc.returncode}\n{log_tail(self.work / 'orthanc.log')}")
            try:
                if self.get("/system", timeout=2).get("HttpPort") == ORTHANC_PORT:
                    break
            except (BenchError, ValueError):
                time.sleep(0.2)
        else:
            raise BenchError(f"Orthanc did not answer within {START_TIMEOUT_S:.0f} s\n{log_tail(self.work / 'orthanc.log')}")
        self.proxy = spawn(
            [*self.link.in_cloud(), sys.executable, str(Path(__file__).resolve()), "_delay-proxy",
             "--listen", f"{CLOUD_IP}:{PROXY_PORT}", "--upstream", f"127.0.0.1:{ORTHANC_PORT}",
             "--delay-ms", str(self.delay_ms), "--stats", str(self.stats_path)],
            self.work / "delay-proxy.log",
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proxy.poll() is not None:
                raise BenchError(f"delay proxy exited with {self.proxy.returncode}\n{log_tail(self.work / 'delay-proxy.log')}")
            probe = run_cmd([*self.link.in_clinic(), "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                             "--max-time", "3", self.dicomweb_url + "/studies"], timeout=10, check=False)  # fmt: skip
            if probe.stdout.strip() == "200":
                break
            time.sleep(0.2)
        else:
            raise BenchError("the delay proxy did not pass a QIDO-RS through within the start timeout")
        self.reset_stats_baseline()

    def reset_stats_baseline(self) -> None:
        time.sleep(0.3)  # the probe's answer has been counted
        self.base = self.stats()

    def stats(self) -> dict[str, object]:
        try:
            return dict(json.loads(self.stats_path.read_text()))
        except (OSError, ValueError):
            return {"up": 0, "down": 0, "requests": {}, "last_up_at": 0.0, "last_down_at": 0.0}

    def phase_stats(self) -> tuple[int, int]:
        """(bytes clinic -> cloud, STOW-RS requests) since the probe."""
        now = self.stats()
        up = int(now["up"]) - int(self.base["up"])  # type: ignore[call-overload]
        stow = sum(n for k, n in dict(now["requests"]).items() if k.startswith("POST /dicom-web"))  # type: ignore[call-overload]
        return up, stow

    def get(self, path: str, timeout: float = 10) -> dict:  # type: ignore[type-arg]
        out = run_cmd([*self.link.in_cloud(), "curl", "-sf", "--max-time", str(timeout),
                       f"http://127.0.0.1:{ORTHANC_PORT}{path}"], timeout=timeout + 5).stdout  # fmt: skip
        return json.loads(out)  # type: ignore[no-any-return]

    def instance_count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def sop_instance_uids(self) -> list[str]:
        return [i["MainDicomTags"]["SOPInstanceUID"] for i in self.get("/instances?expand", timeout=30)]  # type: ignore[attr-defined]

    def transfer_syntaxes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for instance_id in self.get("/instances", timeout=30):  # type: ignore[attr-defined]
            ts = str(self.get(f"/instances/{instance_id}/header?simplify").get("TransferSyntaxUID", "?"))
            counts[ts] = counts.get(ts, 0) + 1
        return counts

    def stop(self) -> None:
        for proc in (self.proxy, self.orthanc):
            if proc is not None:
                stop(proc)


# --------------------------------------------------------------------------- phases


@dataclass
class Result:
    name: str
    expected: int
    received: int = 0
    unique: int = 0
    stow_requests: int = 0
    wire_bytes: int = 0
    link_bytes: int = 0
    dicom_bytes: int = 0
    seconds: float = 0.0
    error: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.error and self.received == self.expected == self.unique


def run_curl_phase(link: Link, cloud: Cloud, bodies: Sequence[Path], per_request_timeout: float) -> float:
    """One curl STOW-RS per instance, sequential; returns the wall seconds of the loop."""
    content_type = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    t0 = time.monotonic()
    for body in bodies:
        proc = run_cmd([
            *link.in_clinic(), "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
            "-H", f"Content-Type: {content_type}", "-H", "Accept: application/dicom+json",
            "-H", "Expect:",  # no 100-continue round trip: the node's client does not wait for one either
            "--data-binary", f"@{body}", "--max-time", str(int(per_request_timeout)),
            cloud.dicomweb_url + "/studies",
        ], timeout=per_request_timeout + 10, check=False)  # fmt: skip
        if proc.stdout.strip() != "200":
            raise BenchError(f"curl STOW-RS of {body.name}: HTTP {proc.stdout.strip() or '-'} {proc.stderr.strip()[-200:]}")
    return time.monotonic() - t0


def write_node_config(path: Path, data_dir: Path, dicomweb_url: str, compress: str, concurrency: int) -> None:
    write_edge_toml(path, {
        "node": {"id": "bench-upload"},
        "dicom": {"ae_title": "EDGE", "port": 11112, "bind_address": "127.0.0.1"},
        "storage": {"data_dir": str(data_dir), "min_free_mb": 0},
        "console": {"port": 18080, "bind_address": "127.0.0.1"},
        "kiosk": {"port": 18081},
        "cloud": {"dicomweb_url": dicomweb_url},
        "sync": {"concurrency": concurrency, "batch_max_bytes": 33554432, "batch_max_instances": 20,
                 "bandwidth_bps": 0, "compress": compress},  # fmt: skip
        "reports": {"enabled": False},  # no report polling traffic on the measured link
    })


def prefill(config: Path, files: Sequence[Path], log_path: Path) -> None:
    """Keep every file in the node's spool as a C-STORE would (a separate process: its own DB handle)."""
    run_cmd([sys.executable, str(Path(__file__).resolve()), "_prefill", str(config), *map(str, files)],
            timeout=300)  # fmt: skip


def _prefill_main(config_path: str, files: Sequence[str]) -> int:
    import edge.node.parts  # noqa: F401  (every part's tables, for open_database)
    from edge.node.config import load_config
    from edge.store.db import open_database
    from edge.store.spool import Spool, keep_instance

    config = load_config(config_path)
    open_database(config.data_dir)
    spool = Spool(config.data_dir)
    for name in files:
        tmp = spool.tmp / (Path(name).name + ".bench")
        shutil.copyfile(name, tmp)
        kept = keep_instance(spool, tmp, calling_aet="BENCH", source="bench")
        if kept.duplicate:
            print(f"duplicate: {name}", file=sys.stderr)
            return 1
    return 0


def run_node_phase(link: Link, cloud: Cloud, work: Path, files: Sequence[Path], compress: str,
                   concurrency: int, timeout: float) -> float:  # fmt: skip
    """Start ``edge serve sync`` on a pre-filled data dir; seconds until every study is synced."""
    config = work / "edge.toml"
    write_node_config(config, work / "data", cloud.dicomweb_url, compress, concurrency)
    prefill(config, files, work / "prefill.log")
    studies = edge_studies(config)
    if sum(int(s["instances"]) for s in studies) != len(files):
        raise BenchError(f"pre-fill kept {sum(int(s['instances']) for s in studies)} of {len(files)} instances")
    os.sync()  # no writeback of the pre-fill during the run
    log = work / "node.log"
    t0 = time.monotonic()
    node = spawn([*link.in_clinic(), str(EDGE), "--config", str(config), "serve", "sync"], log, cwd=work)
    try:
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if node.poll() is not None:
                raise BenchError(f"edge serve sync exited with {node.returncode}\n{log_tail(log)}")
            # Ask the node only once the cloud has everything: `edge studies` costs ~0.5 s of CPU.
            if cloud.instance_count() >= len(files):
                studies = edge_studies(config)
                done = time.monotonic()
                states = [s["sync_state"] for s in studies]
                if states and all(state == "synced" for state in states):
                    return done - t0
                bad = [s for s in studies if s["sync_state"] in ("failed", "quarantined")]
                if bad:
                    raise BenchError(f"study {bad[0]['study_instance_uid']} is {bad[0]['sync_state']}\n{log_tail(log)}")
            time.sleep(POLL_S)
        studies = edge_studies(config)
        raise BenchError(f"not all synced within {timeout:.0f} s: "
                         f"{[s['sync_state'] for s in studies]}\n{log_tail(log)}")  # fmt: skip
    finally:
        stop(node, signal.SIGINT)


def measure(name: str, link: Link, root: Path, files: Sequence[Path], bodies: Sequence[Path],
            args: argparse.Namespace) -> Result:  # fmt: skip
    dicom_bytes = sum(p.stat().st_size for p in files)
    result = Result(name, expected=len(files), dicom_bytes=dicom_bytes)
    work = Path(tempfile.mkdtemp(prefix=f"{name.split()[0]}-", dir=root))
    cloud = Cloud(link, work, args.delay_ms)
    # Generous bound: three times the uncompressed transfer at the link rate, plus start-up.
    timeout = 3 * dicom_bytes / link.rate_bytes_per_s + 120
    try:
        cloud.start()
        link_before, dropped_before = link.link_bytes(), link.dropped_packets()
        if name.startswith("curl"):
            result.seconds = run_curl_phase(link, cloud, bodies, timeout)
        else:
            compress = name.split("=")[1]
            result.seconds = run_node_phase(link, cloud, work, files, compress, args.concurrency, timeout)
        time.sleep(0.3)  # the proxy's stats file catches up
        result.wire_bytes, result.stow_requests = cloud.phase_stats()
        result.link_bytes = link.link_bytes() - link_before
        if args.loss > 0:
            result.notes.append(f"packets dropped by --loss: {link.dropped_packets() - dropped_before}")
        uids = cloud.sop_instance_uids()
        result.received = cloud.instance_count()
        result.unique = len(set(uids))
        if args.show_syntax:
            result.notes.append(f"stored transfer syntaxes: {cloud.transfer_syntaxes()}")
    except BenchError as exc:
        result.error = str(exc)
        try:
            result.received = cloud.instance_count()
            result.unique = len(set(cloud.sop_instance_uids()))
        except BenchError:
            pass
    finally:
        cloud.stop()
        if not result.ok:
            result.notes += [t for t in (log_tail(work / "orthanc.log"), log_tail(work / "delay-proxy.log")) if t]
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.rmtree(work / "orthanc-storage", ignore_errors=True)
    return result


# --------------------------------------------------------------------------- report


def print_results(results: Sequence[Result], link: Link) -> None:
    uncompressed = next((r for r in results if r.name.endswith("=none") and r.ok), None)
    print()
    print(f"{'phase':28} {'in cloud':>9} {'STOW reqs':>9} {'wire MB':>8} {'link MB':>8} {'seconds':>8} "
          f"{'goodput':>8} {'DICOM MB/s':>10} {'speed vs none':>13}")  # fmt: skip
    for r in results:
        goodput = r.wire_bytes / r.seconds / link.rate_bytes_per_s if r.seconds else 0.0
        effective = r.dicom_bytes / 1e6 / r.seconds if r.seconds else 0.0
        ratio = "-"
        if uncompressed is not None and r.ok and r.seconds:
            ratio = f"{uncompressed.seconds / r.seconds:.2f}x"
        cloud = f"{r.received}/{r.expected}" + ("" if r.unique == r.received else f" ({r.unique} uniq)")
        print(f"{r.name:28} {cloud:>9} {r.stow_requests:>9} {r.wire_bytes / 1e6:>8.1f} {r.link_bytes / 1e6:>8.1f} "
              f"{r.seconds:>8.1f} {goodput:>7.1%} {effective:>10.3f} {ratio:>13}")  # fmt: skip
    for r in results:
        for note in r.notes if r.ok else []:
            print(f"  {r.name}: {note}")
        if not r.ok:
            print(f"\nFAILED: {r.name}: {r.error or f'cloud holds {r.received} ({r.unique} unique) of {r.expected}'}")
            for note in r.notes:
                print(note)


def goal_lines(results: Sequence[Result], link: Link) -> list[str]:
    none = next((r for r in results if r.name.endswith("=none") and r.ok), None)
    jls = next((r for r in results if r.name.endswith("=jpeg-ls") and r.ok), None)
    lines = []
    if none is None:
        lines.append(f"GOAL goodput >= {GOAL_GOODPUT:.0%} of link (edge, uncompressed): not measured")
    else:
        goodput = none.wire_bytes / none.seconds / link.rate_bytes_per_s
        verdict = "met" if goodput >= GOAL_GOODPUT else "MISSED"
        lines.append(f"GOAL goodput >= {GOAL_GOODPUT:.0%} of link (edge, uncompressed): {goodput:.1%}: {verdict}")
    if none is None or jls is None:
        lines.append(f"GOAL effective DICOM rate >= {GOAL_COMPRESSED_SPEEDUP:.0f}x with jpeg-ls vs none: not measured")
    else:
        speedup = none.seconds / jls.seconds
        verdict = "met" if speedup >= GOAL_COMPRESSED_SPEEDUP else "MISSED"
        lines.append(f"GOAL effective DICOM rate >= {GOAL_COMPRESSED_SPEEDUP:.0f}x with jpeg-ls vs none: "
                     f"{speedup:.2f}x: {verdict}")  # fmt: skip
    return lines


# --------------------------------------------------------------------------- main


PHASES = {"curl": "curl (1 POST per instance)", "none": "edge sync compress=none", "jpeg-ls": "edge sync compress=jpeg-ls"}


def check_tools() -> None:
    missing = [t for t in (ORTHANC, DICOMWEB_PLUGIN, str(EDGE)) if not os.path.exists(t)]
    missing += [t for t in ("ip", "tc", "curl") if shutil.which(t) is None]
    if missing:
        raise BenchError(f"missing: {', '.join(missing)} (iproute2, curl, orthanc, orthanc-dicomweb)")
    if os.geteuid() != 0:
        raise BenchError("needs root for network namespaces and tc")


def node_has_sync() -> bool:
    proc = subprocess.run([sys.executable, "-c", "from edge.node.services import SERVICE_NAMES; print(' '.join(SERVICE_NAMES))"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)  # fmt: skip
    return "sync" in proc.stdout.split()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=12, help="DR images, ~18 MB each (default 12)")
    parser.add_argument("--per-study", type=int, default=2, help="images per study (default 2: PA + lateral)")
    parser.add_argument("--rate-mbit", type=float, default=10.0, help="link rate, Mbit/s (default 10)")
    parser.add_argument("--delay-ms", type=float, default=50.0, help="one-way delay in the proxy (default 50: ~100 ms RTT)")
    parser.add_argument("--loss", type=float, default=0.0, help="percent of clinic packets dropped (nftables; default 0)")
    parser.add_argument("--noise", type=float, default=8.0, help="pixel noise sigma; more noise compresses worse (default 8)")
    parser.add_argument("--concurrency", type=int, default=2, help="[sync] concurrency for the node (default 2)")
    parser.add_argument("--phases", default="curl,none,jpeg-ls", help="which phases, comma-separated (default all)")
    parser.add_argument("--show-syntax", action="store_true", help="list the transfer syntaxes Orthanc stored")
    parser.add_argument("--keep", action="store_true", help="keep each phase's work dir (logs) under the temp dir")
    parser.add_argument("--tmp", type=Path, default=None, help="parent of the temp dir (default: system temp)")
    args = parser.parse_args(argv)
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if unknown := [p for p in args.phases if p not in PHASES]:
        parser.error(f"unknown phase(s) {unknown}; choose from {', '.join(PHASES)}")
    if min(args.count, args.per_study, args.concurrency) < 1 or args.rate_mbit <= 0 or not 0 <= args.loss < 100:
        parser.error("--count, --per-study, --concurrency >= 1; --rate-mbit > 0; 0 <= --loss < 100")
    return args


def run(args: argparse.Namespace, root: Path, link: Link) -> list[Result]:
    t0 = time.monotonic()
    images = root / "images"
    images.mkdir()
    files = generate_images(images, args.count, args.per_study, args.noise)
    bodies: list[Path] = []
    if "curl" in args.phases:
        (root / "bodies").mkdir()
        bodies = build_bodies(files, root / "bodies")
    total = sum(p.stat().st_size for p in files)
    print(f"generated {len(files)} DX images (3000x3000, 12-bit, noise sigma {args.noise}), "
          f"{total / len(files) / 1e6:.1f} MB each, {total / 1e6:.0f} MB total, in {time.monotonic() - t0:.1f} s")  # fmt: skip
    link.open()
    print(f"link: namespaces {link.clinic} -> {link.cloud}, tbf {args.rate_mbit} Mbit/s on the clinic side, "
          f"{args.delay_ms:.0f} ms each way in a userspace proxy, loss {args.loss}%; "
          f"uncompressed at line rate: {total / link.rate_bytes_per_s:.0f} s")  # fmt: skip
    has_sync = node_has_sync()
    results = []
    for phase in args.phases:
        name = PHASES[phase]
        if phase != "curl" and not has_sync:
            result = Result(name, expected=len(files), error="`edge serve sync` does not exist yet in this checkout")
            results.append(result)
            print(f"  {name}: NOT RUN ({result.error})", flush=True)
            continue
        print(f"  {name} ...", flush=True)
        result = measure(name, link, root, files, bodies, args)
        status = "ok" if result.ok else f"FAILED: {result.error.splitlines()[0] if result.error else 'count'}"
        print(f"     {result.received}/{result.expected} in the cloud, {result.seconds:.1f} s: {status}", flush=True)
        results.append(result)
    return results


@contextmanager
def workspace(parent: Path | None, link: Link, keep: bool) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="edge-upload-bench-", dir=parent))
    try:
        yield root
    finally:
        link.close()
        if keep:
            shutil.rmtree(root / "images", ignore_errors=True)
            shutil.rmtree(root / "bodies", ignore_errors=True)
            print(f"kept logs under {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_delay-proxy"]:
        sub = argparse.ArgumentParser(prog="upload.py _delay-proxy")
        sub.add_argument("--listen", required=True)
        sub.add_argument("--upstream", required=True)
        sub.add_argument("--delay-ms", type=float, required=True)
        sub.add_argument("--stats", type=Path, required=True)
        a = sub.parse_args(argv[1:])
        asyncio.run(_delay_proxy(a.listen, a.upstream, a.delay_ms, a.stats))
        return 0
    if argv[:1] == ["_prefill"]:
        return _prefill_main(argv[1], argv[2:])
    args = parse_args(argv)
    interrupt_on_sigterm()
    link = Link(args.rate_mbit, args.loss)
    try:
        check_tools()
        with workspace(args.tmp, link, args.keep) as root:
            results = run(args, root, link)
            print_results(results, link)
    except (BenchError, KeyboardInterrupt) as exc:
        return abort_status(exc)
    print()
    for line in goal_lines(results, link):
        print(line)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
