"""Technician console and worklist speed with a busy day: 500 visits, 500 scheduled items.

Starts a real node (`edge run`, sync off) on a temp data dir seeded with 500 registered
orders (the console's own `create_order`), 400 of them with a received study (2 instances
each, outbox rows spread over pending/sending/synced/failed/quarantined, some reports
ready). Then, with a logged-in HTTP client:

- **Today page**: `GET /` (the full server-rendered page with 500 rows) and
  `GET /api/today` (what each open console polls every `refresh_s`), N requests each,
  p50/p95 of the round trip as the client sees it.
- **Worklist**: DCMTK `findscu -W` (Modality=DX, today) answered with all 500 items:
  wall time per query including findscu's own start-up, beside DCMTK's `wlmscpfs` serving
  the same 500 items from worklist files (the stock file-based worklist SCP), and
  `findscu` against a query with no matches (the floor: process start + association).
  findscu writes each answer to a file (`-X`, so the count is checked) in a tmpfs when
  there is one (/dev/shm): a DR keeps its worklist in memory, and 500 file writes on a
  slow disk would time the disk, not the worklist server. The server's own CPU time per
  query (from /proc) is printed beside it: it does not move with other load on the box.
- **Hostile wildcard**: `PatientName=*?*?*?*?*?*?*?*Q` (issue 12: the old regex matcher
  held the GIL 10 s on one long name) matched in-process against 500 long names
  ("Mahlangu-Ramaphosa-Nkosi^Nomvula Thandiwe Precious" variants), and the same key
  through findscu against the running node. ``--before`` also times the replaced regex on
  one such name (seconds; it is the figure the fix removed).

    .venv/bin/python bench/console.py              # 500 visits, 50 requests / 20 queries
    .venv/bin/python bench/console.py --visits 100 --requests 20
    .venv/bin/python bench/console.py --before     # also the old regex matcher on one long name

Goal: page p95 < 200 ms and worklist response < 200 ms.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydicom.dataset import FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from tests.node import EdgeNode, wait_for_port  # noqa: E402
from tests.console.helpers import ConsoleClient, add_user  # noqa: E402

FINDSCU = "/usr/bin/findscu"
HOSTILE_KEY = "*?*?*?*?*?*?*?*Q"
LONG_NAME = "Mahlangu-Ramaphosa-Nkosi^Nomvula Thandiwe Precious"
WLMSCPFS = "/usr/bin/wlmscpfs"
STATES = ("pending", "pending", "sending", "synced", "synced", "synced", "failed", "quarantined")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def seed(data_dir: Path, visits: int, node_id: str) -> None:
    """Orders through the console's own code; studies and outbox rows as ingest leaves them."""
    from edge.orders.register import ExamChoice, Patient, create_order
    from edge.store.db import database, open_database, write_transaction
    from edge.store.models import Instance, Outbox, Series, Study

    open_database(data_dir)
    rng = random.Random(7)
    orders = []
    for i in range(visits):
        exam = ExamChoice("Chest X-ray", "DX")
        patient = Patient(f"PATIENT{i:04d}^TEST", f"F-{i:05d}", "folder", "19800101", "F", exam)
        orders.append(create_order(patient, node_id=node_id, station_ae="DR", by="bench"))
    with write_transaction():
        for order in orders[: int(visits * 0.8)]:
            study = Study.create(study_instance_uid=order.study_instance_uid, accession_number=order.accession_number,
                                 patient_id="", study_date=order.scheduled_date,
                                 report_state=rng.choice(("none", "none", "none", "ready", "printed")))
            series = Series.create(series_instance_uid=generate_uid(), study=study, modality=order.modality)
            for _ in range(2):
                inst = Instance.create(sop_instance_uid=generate_uid(), sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                                       study=study, series=series, path="x", size=rng.randint(5, 20) * 2**20,
                                       sha256="0" * 64, transfer_syntax=ExplicitVRLittleEndian)
                state = rng.choice(STATES)
                Outbox.create(instance=inst, state=state,
                              last_error="cloud refused: 0xA900" if state in ("failed", "quarantined") else "")
    database.close()


def seed_long_names(data_dir: Path, visits: int) -> None:
    """As many more orders with long, realistic names: what the hostile wildcard is matched against."""
    from edge.orders.register import ExamChoice, Patient, create_order
    from edge.store.db import database, open_database

    open_database(data_dir, migrate=False)
    database.execute_sql("PRAGMA synchronous=OFF")  # this connection only: seeding
    for i in range(visits):
        patient = Patient(f"{LONG_NAME}{i:03d}", f"L-{i:05d}", "folder", "19800101", "F", ExamChoice("Chest X-ray", "DX"))
        create_order(patient, node_id="clinic-0001", station_ae="DR", by="bench")
    database.close()


def time_get(client: ConsoleClient, path: str, n: int) -> list[float]:
    client.request("GET", path)  # warm-up (and the first matching pass)
    out = []
    for _ in range(n):
        start = time.perf_counter()
        status, body, _ = client.request("GET", path)
        out.append((time.perf_counter() - start) * 1000)
        assert status == 200, status
    return out


def cpu_ms(pid: int) -> float:
    """CPU time (user + system) a server has used so far, with its children: finished (wlmscpfs forks)
    and running (``edge run`` supervises the DICOM service as a child process)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:  # the child ended between the reads: its time is in the parent's "finished" fields
        return 0.0
    own = sum(int(f) for f in fields[11:15]) * 1000 / os.sysconf("SC_CLK_TCK")
    return own + sum(cpu_ms(int(child)) for child in children)


def scratch_dir(tmp: Path, name: str) -> Path:
    """Where findscu writes its answers: a tmpfs when the machine has one."""
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix=f"edge-bench-{name}-", dir=shm if shm.is_dir() else tmp))


def time_find(port: int, aet: str, keys: list[str], n: int, expect: int, workdir: Path,
              server_pid: int | None = None) -> tuple[list[float], float | None]:
    """Wall time per query, and the server's CPU milliseconds per query (None without a pid)."""
    out = []
    cpu_before = cpu_ms(server_pid) if server_pid else 0.0
    for _ in range(n):
        for old in workdir.glob("rsp*.dcm"):
            old.unlink()
        args = [FINDSCU, "-W", "-X", "-od", str(workdir), "-aet", "DR", "-aec", aet]
        for key in keys:
            args += ["-k", key]
        start = time.perf_counter()
        result = subprocess.run([*args, "127.0.0.1", str(port)], capture_output=True, text=True)
        out.append((time.perf_counter() - start) * 1000)
        got = len(list(workdir.glob("rsp*.dcm")))
        assert result.returncode == 0 and got == expect, (result.returncode, got, expect, result.stderr[-500:])
    return out, ((cpu_ms(server_pid) - cpu_before) / n if server_pid else None)


def wlmscpfs_baseline(tmp: Path, n: int, keys: list[str], expect: int) -> tuple[list[float], float | None] | None:
    """The same worklist items as DCMTK worklist files, served by wlmscpfs."""
    if not Path(WLMSCPFS).exists():
        return None
    from edge.dicom.worklist import WorklistQuery, item_dataset, scheduled_items
    from edge.store.db import open_database

    open_database(tmp / "node" / "var")
    today = dt.date.today().strftime("%Y%m%d")
    items = scheduled_items(WorklistQuery(today, today, modality="DX", patient_id="F-*"))  # not the long names
    folder = tmp / "wl" / "WLM"
    folder.mkdir(parents=True)
    (folder / "lockfile").touch()
    for i, item in enumerate(items):
        ds = item_dataset(item)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.31"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.save_as(folder / f"item{i:04d}.wl", enforce_file_format=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([WLMSCPFS, "-dfp", str(tmp / "wl"), str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc=proc)
        work = scratch_dir(tmp, "find-wl")
        try:
            time_find(port, "WLM", keys, 1, expect, work)  # warm-up: wlmscpfs reads its files
            return time_find(port, "WLM", keys, n, expect, work, proc.pid)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    finally:
        proc.terminate()
        proc.wait(10)


def hostile_matching(before: bool) -> list[str]:
    """The hostile key against 500 long names, in-process: ours, and optionally the regex it replaced."""
    import re

    from edge.dicom.worklist import matches

    names = [f"{LONG_NAME}{i:03d}" for i in range(500)]
    out = []
    for key in (HOSTILE_KEY, "*?" * 40 + "*Q"):
        runs = []
        for _ in range(20):
            start = time.perf_counter()
            for name in names:
                matches(key, name, fold=True)
            runs.append((time.perf_counter() - start) * 1000)
        out.append(f"  {'linear matcher, ' + key[:24] + (' …' if len(key) > 24 else ''):46} "
                   f"p50 {statistics.median(runs):7.2f} ms for 500 names   max {max(runs):7.2f} ms")
    if before:  # the matcher edge/dicom/worklist.py had until issue 12
        body = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in HOSTILE_KEY)
        pattern = re.compile(f"^{body}$", re.IGNORECASE | re.DOTALL)
        start = time.perf_counter()
        pattern.match(LONG_NAME)
        one = time.perf_counter() - start
        out.append(f"  {'old regex matcher, ' + HOSTILE_KEY:46} {one * 1000:9.0f} ms for ONE name "
                   f"(500 names: ~{one * 500 / 60:.0f} min, GIL held)")
    return out


def line(name: str, values: list[float], goal: float | None = None, cpu: float | None = None) -> str:
    p95 = pct(values, 95)
    verdict = "" if goal is None else ("  goal < %.0f ms: %s" % (goal, "MET" if p95 < goal else "MISSED"))
    server = "" if cpu is None else f"   server CPU {cpu:6.1f} ms/query"
    return (f"  {name:46} p50 {statistics.median(values):7.1f} ms   p95 {p95:7.1f} ms   (n={len(values)})"
            f"{server}{verdict}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--visits", type=int, default=500)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--before", action="store_true", help="also time the replaced regex matcher (seconds)")
    args = parser.parse_args()
    os.environ.pop("http_proxy", None)
    tmp = Path(tempfile.mkdtemp(prefix="edge-bench-console-"))
    node: EdgeNode | None = None
    try:
        (tmp / "node").mkdir()
        node = EdgeNode(tmp / "node", ("run",), node={"id": "clinic-0001"}, sync={"enabled": False},
                        reports={"enabled": False}, bridge={"enabled": False, "port_glob": ""},
                        kiosk={"bind_address": "127.0.0.1"},
                        dicom={"modality_ae": "DR", "modality_host": "127.0.0.1"})  # findscu is the DR
        t0 = time.perf_counter()
        seed(node.data_dir, args.visits, "clinic-0001")
        print(f"seeded {args.visits} visits ({int(args.visits * 0.8)} with studies) in {time.perf_counter() - t0:.1f} s")
        add_user(node, "bench", "bench-pass-1", "technician")
        node.start()
        client = ConsoleClient(node)
        assert client.login("bench", "bench-pass-1") == 303
        status, page = client.get("/")
        rows = page.count("<tr data-order=")
        print(f"today page: {len(page) / 1024:.0f} KiB with {rows} visit rows")
        page_times = time_get(client, "/", args.requests)
        api_times = time_get(client, "/api/today", args.requests)

        today = dt.date.today().strftime("%Y%m%d")
        sps = "ScheduledProcedureStepSequence[0]"
        keys = [f"{sps}.Modality=DX", f"{sps}.ScheduledProcedureStepStartDate={today}", "PatientName", "PatientID",
                "AccessionNumber", "StudyInstanceUID", f"{sps}.ScheduledStationAETitle"]
        expect = args.visits
        work = scratch_dir(tmp, "find")
        pid = node.proc.pid if node.proc is not None else None
        cold, _ = time_find(node.port, node.ae_title, keys, 1, expect, work)  # encodes every item once
        ours, ours_cpu = time_find(node.port, node.ae_title, keys, args.queries, expect, work, pid)
        empty, empty_cpu = time_find(node.port, node.ae_title, [f"{sps}.Modality=CR"], args.queries, 0, work, pid)
        seed_long_names(node.data_dir, args.visits)  # into the running node's store, after the figures above
        hostile, hostile_cpu = time_find(node.port, node.ae_title, [f"PatientName={HOSTILE_KEY}", "PatientID"],
                                         args.queries, 0, work, pid)
        shutil.rmtree(work, ignore_errors=True)
        node.stop()
        node = None
        baseline = wlmscpfs_baseline(tmp, args.queries, keys, expect)

        print(f"\nconsole, {args.visits} visits in the day (logged-in HTTP client, round trip):")
        print(line("GET /  (full page)", page_times, 200))
        print(line("GET /api/today  (live-state poll)", api_times, 200))
        print(f"\nworklist C-FIND answered with {expect} items (DCMTK findscu -W wall time, incl. its start-up):")
        print(line("our node (pynetdicom MWL SCP)", ours, 200, ours_cpu))
        print(f"  {'our node, first query after start (encodes all)':46} {cold[0]:7.1f} ms")
        if baseline is not None:
            print(line("DCMTK wlmscpfs, same items from .wl files", *baseline[:1], cpu=baseline[1]))
        print(line("our node, query matching nothing (floor)", empty, cpu=empty_cpu))
        print(line(f"+{args.visits} long names, PatientName={HOSTILE_KEY}", hostile, cpu=hostile_cpu))
        print("\nhostile wildcard, in-process:")
        print("\n".join(hostile_matching(args.before)))
        return 0
    finally:
        if node is not None:
            node.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
