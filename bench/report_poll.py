"""Report poll benchmark: how soon does a verified report reach the kiosk, and what does asking cost the uplink?

Why this exists: a report already in the cloud used to reach the kiosk only at its study's
next poll, on a per-study backoff from 60 s to an hour (measured 57-180 s, up to ~61 min),
and each waiting study cost its own QIDO-RS requests. The goal (issue 14): with the
shipped edge.toml, p95 from "SR stored in the cloud" to "ready at the kiosk" under 30 s,
with at most one QIDO-RS per poll for all waiting studies (UID-list matching, split only
to keep URLs short).

Run:  .venv/bin/python bench/report_poll.py [--studies 200] [--window-s 600] [--tail-s 120]

Both designs run in the same run, side by side, against one real Orthanc (DICOMweb) over
the link of ``bench/upload.py``: two network namespaces, the clinic's egress shaped to
``--rate-mbit`` (10) by ``tc tbf``, ``--delay-ms`` (50) each way in a userspace proxy
(100 ms round trip). Each design has its own delay proxy, whose byte and request counts
are that design's uplink cost:

  * batched: ``sync.reports.ReportPuller`` as shipped ([reports] defaults), every
    ``poll_interval_s``, on a real node database;
  * per-study: the design before issue 14, re-implemented here from its old code: every
    60 s, at most 20 due studies, each asked with three QIDO-RS, backing off per study
    (``backoff_delay``: 60 s doubling to 3600 s) until its report is found.

``--studies`` studies (one DX each) are in the cloud and waiting from the start. After
``--warmup-s``, the reader's verified SR for each study is stored into Orthanc (REST, on
the cloud side, not over the uplink) at a uniformly random moment within ``--window-s``;
the run ends ``--tail-s`` after the last one. Latency = ready time minus stored time;
a report not ready by the end counts as the end of the run (so the per-study p95 is a
lower bound). Requests and bytes per hour are scaled from the whole run.

Needs root (namespaces, tc), iproute2, curl, Orthanc with the DICOMweb plugin. Exits
non-zero only when the run could not be made, never because a goal was missed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, BenchError, interrupt_on_sigterm, run_cmd, spawn, stop
from upload import CLOUD_IP, ORTHANC_PORT, PROXY_PORT, Cloud, Link

OLD_PORT = PROXY_PORT + 1  # the per-study design's own delay proxy
GOAL_P95_S = 30.0


# --------------------------------------------------------------------------- DICOM


def _sr_bytes(study_uid: str, patient_id: str, path: Path) -> None:
    """The reader's verified Basic Text SR for ``study_uid``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as Seq
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    def code(value: str, scheme: str, meaning: str) -> Dataset:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
        return item

    now = dt.datetime.now().strftime("%Y%m%d%H%M%S")
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "BENCH^PATIENT", patient_id, "SR"
    ds.SeriesNumber, ds.InstanceNumber = 99, 1
    ds.ContentDate, ds.ContentTime = now[:8], now[8:]
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = Seq([code("18748-4", "LN", "Diagnostic imaging report")])
    finding = Dataset()
    finding.RelationshipType, finding.ValueType, finding.TextValue = "CONTAINS", "TEXT", "No acute findings."
    finding.ConceptNameCodeSequence = Seq([code("121071", "DCM", "Finding")])
    ds.ContentSequence = Seq([finding])
    observer = Dataset()
    observer.VerifyingObserverName, observer.VerificationDateTime = "Reader^Bench", now
    observer.VerifyingOrganization = "Regional Imaging"
    observer.VerifyingObserverIdentificationCodeSequence = Seq([])
    ds.VerifyingObserverSequence = Seq([observer])
    ds.VerificationFlag, ds.CompletionFlag = "VERIFIED", "COMPLETE"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = UID(ds.SOPClassUID), UID(ds.SOPInstanceUID)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)


def _orthanc_post(cloud: Cloud, path: Path) -> None:
    run_cmd([*cloud.link.in_cloud(), "curl", "-sf", "--max-time", "20", "-X", "POST", "--data-binary", f"@{path}",
             f"http://127.0.0.1:{ORTHANC_PORT}/instances"], timeout=30)  # fmt: skip


# --------------------------------------------------------------------------- the clinic side (in its namespace)


async def _clinic(work: Path, new_url: str, old_url: str, end_at: float) -> dict[str, Any]:
    """Both designs until ``end_at``; returns {design: {study_uid: ready_at epoch}}."""
    import aiohttp

    import edge.node.parts  # noqa: F401  (the store learns every part's tables)
    from edge.store.db import open_database, write_transaction
    from edge.store.models import Instance, Outbox, Series, Study, utcnow
    from edge.store.rows import rows
    from sync.config import ReportsSection
    from sync.dicomweb import DicomWebClient
    from sync.reports import ReportPuller, ReportSettings, backoff_delay
    from sync.tables import Report

    studies: list[str] = json.loads((work / "studies.json").read_text())
    open_database(work / "var")
    now = utcnow()
    with write_transaction():
        for n, uid in enumerate(studies):
            study = Study.create(study_instance_uid=uid, accession_number=f"B{n:06d}", patient_id=f"P{n}",
                                 received_at=now, report_state="none")
            series = Series.create(series_instance_uid=f"{uid}.1", study=study, modality="DX")
            inst = Instance.create(study=study, series=series, sop_instance_uid=f"{uid}.1.1", path=f"bench/{n}.dcm",
                                   sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", size=1, sha256="0" * 64,
                                   transfer_syntax="1.2.840.10008.1.2.1")
            Outbox.create(instance=inst, state="synced", synced_at=now)
    shipped = ReportsSection()
    settings = ReportSettings(lookback_days=shipped.lookback_days, poll_interval_s=shipped.poll_interval_s,
                              min_backoff_s=shipped.min_backoff_s, max_backoff_s=shipped.max_backoff_s,
                              max_url_chars=shipped.max_url_chars, query_timeout_s=shipped.query_timeout_s)
    timeout = aiohttp.ClientTimeout(total=120, connect=10)
    old_ready: dict[str, float] = {}

    async def batched(session: aiohttp.ClientSession) -> None:
        puller = ReportPuller(work / "var", settings)
        client = DicomWebClient(session, new_url)
        while time.time() < end_at:
            started = time.monotonic()
            await puller.poll_due(client)
            await asyncio.sleep(max(0.0, settings.poll_interval_s - (time.monotonic() - started)))

    async def per_study(session: aiohttp.ClientSession) -> None:
        """The pre-issue-14 puller: 60 s rounds, <= 20 due studies, 3 QIDO-RS each, backoff per study."""
        client = DicomWebClient(session, old_url)
        old = ReportSettings(min_backoff_s=60.0, max_backoff_s=3600.0)
        due_at = {uid: 0.0 for uid in studies}
        attempts = {uid: 0 for uid in studies}
        while time.time() < end_at:
            started = time.monotonic()
            due = sorted((at, uid) for uid, at in due_at.items() if uid not in old_ready and at <= time.time())[:20]
            for _, uid in due:
                items = await client.find_report_instances(uid)
                if items:
                    item = items[0]
                    series = str(item["0020000E"]["Value"][0])
                    sop = str(item["00080018"]["Value"][0])
                    await client.retrieve_instance(uid, series, sop, work / "old-report.dcm")
                    old_ready[uid] = time.time()
                else:
                    attempts[uid] += 1
                    due_at[uid] = time.time() + backoff_delay(attempts[uid], old)
            await asyncio.sleep(max(0.0, 60.0 - (time.monotonic() - started)))

    async with aiohttp.ClientSession(timeout=timeout) as new_session, aiohttp.ClientSession(timeout=timeout) as old_session:
        tasks = [asyncio.create_task(batched(new_session)), asyncio.create_task(per_study(old_session))]
        await asyncio.sleep(max(0.0, end_at - time.time()))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    new_ready = {
        uid: fetched.replace(tzinfo=dt.UTC).timestamp()
        for uid, fetched in rows(Report.select(Study.study_instance_uid, Report.fetched_at).join(Study),
                                 tuple[str, dt.datetime])
    }
    return {"batched": new_ready, "per-study": old_ready}


# --------------------------------------------------------------------------- the run


def _percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main(argv: list[str]) -> int:
    if argv[:1] == ["_clinic"]:
        sub = argparse.ArgumentParser(prog="report_poll.py _clinic")
        sub.add_argument("--work", type=Path, required=True)
        sub.add_argument("--new-url", required=True)
        sub.add_argument("--old-url", required=True)
        sub.add_argument("--end-at", type=float, required=True)
        a = sub.parse_args(argv[1:])
        (a.work / "ready.json").write_text(json.dumps(asyncio.run(_clinic(a.work, a.new_url, a.old_url, a.end_at))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--warmup-s", type=float, default=20.0)
    parser.add_argument("--window-s", type=float, default=600.0)
    parser.add_argument("--tail-s", type=float, default=120.0)
    parser.add_argument("--rate-mbit", type=float, default=10.0)
    parser.add_argument("--delay-ms", type=float, default=50.0, help="each way (the round trip is twice this)")
    parser.add_argument("--seed", type=int, default=14)
    args = parser.parse_args(argv)
    interrupt_on_sigterm()
    sys.path.insert(0, str(REPO))
    from tests.dicom_factory import make_dx

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="edge-bench-reports-"))
    link = Link(args.rate_mbit, 0.0)
    cloud = Cloud(link, work, args.delay_ms)
    old_proxy = None
    clinic = None
    try:
        link.open()
        cloud.start()
        old_stats = work / "old-proxy-stats.json"
        old_proxy = spawn(
            [*link.in_cloud(), sys.executable, str(REPO / "bench" / "upload.py"), "_delay-proxy",
             "--listen", f"{CLOUD_IP}:{OLD_PORT}", "--upstream", f"127.0.0.1:{ORTHANC_PORT}",
             "--delay-ms", str(args.delay_ms), "--stats", str(old_stats)],
            work / "old-proxy.log",
        )  # fmt: skip
        images = work / "images"
        images.mkdir()
        studies: list[tuple[str, str]] = []
        print(f"storing {args.studies} studies in the cloud ...", flush=True)
        for n in range(args.studies):
            ds = make_dx(images / f"dx{n}.dcm", rows=16, cols=16)
            _orthanc_post(cloud, images / f"dx{n}.dcm")
            studies.append((str(ds.StudyInstanceUID), str(ds.PatientID)))
        (work / "studies.json").write_text(json.dumps([uid for uid, _ in studies]))
        time.sleep(0.5)
        cloud.reset_stats_baseline()
        old_base = json.loads(old_stats.read_text())
        t0 = time.time()
        store_at = sorted((t0 + args.warmup_s + rng.uniform(0, args.window_s), uid, pid) for uid, pid in studies)
        end_at = t0 + args.warmup_s + args.window_s + args.tail_s
        clinic = spawn(
            [*link.in_clinic(), sys.executable, str(Path(__file__).resolve()), "_clinic", "--work", str(work),
             "--new-url", cloud.dicomweb_url, "--old-url", f"http://{CLOUD_IP}:{OLD_PORT}/dicom-web",
             "--end-at", str(end_at)],
            work / "clinic.log", cwd=REPO,
        )  # fmt: skip
        stored: dict[str, float] = {}
        for at, uid, pid in store_at:
            time.sleep(max(0.0, at - time.time()))
            _sr_bytes(uid, pid, work / "sr.dcm")
            _orthanc_post(cloud, work / "sr.dcm")
            stored[uid] = time.time()
        if clinic.wait(timeout=max(60.0, end_at - time.time() + 120)) != 0:
            raise BenchError(f"the clinic side failed:\n{(work / 'clinic.log').read_text()[-2000:]}")
        hours = (end_at - t0) / 3600
        ready = json.loads((work / "ready.json").read_text())
        new_now, old_now = cloud.stats(), json.loads(old_stats.read_text())
        costs = {
            "batched": _cost(cloud.base, new_now, len(ready["batched"])),
            "per-study": _cost(old_base, old_now, len(ready["per-study"])),
        }
        print(f"\n{args.studies} studies waiting, SRs stored over {args.window_s:.0f} s, run {hours * 60:.1f} min, "
              f"link {args.rate_mbit:g} Mbit/s, {2 * args.delay_ms:.0f} ms round trip")  # fmt: skip
        print(f"{'design':<10} {'ready':>7} {'p50 s':>7} {'p95 s':>7} {'max s':>7} {'QIDO/h':>8} {'req/h':>8} "
              f"{'up KB/h':>9} {'down KB/h':>10}")  # fmt: skip
        for design in ("batched", "per-study"):
            got = ready[design]
            lat = [(got.get(uid, end_at)) - stored[uid] for uid in stored]
            qido, requests, up, down = costs[design]
            print(f"{design:<10} {sum(1 for u in stored if u in got):>4}/{len(stored):<3}"
                  f"{_percentile(lat, 50):>7.1f} {_percentile(lat, 95):>7.1f} {max(lat):>7.1f} "
                  f"{qido / hours:>8.0f} {requests / hours:>8.0f} {up / 1024 / hours:>9.0f} {down / 1024 / hours:>10.0f}")  # fmt: skip
        p95 = _percentile([ready["batched"].get(u, end_at) - stored[u] for u in stored], 95)
        print(f"\ngoal: batched p95 under {GOAL_P95_S:.0f} s: {'met' if p95 <= GOAL_P95_S else 'MISSED'} ({p95:.1f} s)")
        return 0
    except BenchError as exc:
        print(f"report_poll: {exc}", file=sys.stderr)
        return 1
    finally:
        if clinic is not None:
            stop(clinic)
        if old_proxy is not None:
            stop(old_proxy)
        cloud.stop()
        link.close()
        shutil.rmtree(work, ignore_errors=True)


def _cost(base: dict[str, Any], now: dict[str, Any], fetched: int) -> tuple[int, int, int, int]:
    """(QIDO-RS requests, all requests, bytes up, bytes down) between two proxy snapshots.

    The proxy counts requests by their first path segments, where QIDO-RS and WADO-RS of
    a study look alike; one WADO-RS per report fetched, so the rest of the GETs are QIDO-RS.
    """
    before, after = dict(base.get("requests", {})), dict(now.get("requests", {}))
    diff = {k: int(v) - int(before.get(k, 0)) for k, v in after.items()}
    gets = sum(n for k, n in diff.items() if k.startswith("GET "))
    return gets - fetched, sum(diff.values()), int(now["up"]) - int(base["up"]), int(now["down"]) - int(base["down"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
