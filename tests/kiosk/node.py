"""The kiosk as a process and the studies and slips it serves, for the tests and the benchmarks.

It imports no pytest, so bench/ uses it from the run-only venv; tests/kiosk/conftest.py makes
the fixtures from it.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid

from tests.node import wait_for_port, write_config


def seed_study(data_dir: Path, accession: str, report_text: str | None = None, pdf: bytes | None = None,
               study_date: str = "20261123") -> str:
    """A study on the node; with ``report_text`` (SR) or ``pdf`` its report is stored and ready."""
    import edge.node.parts  # noqa: F401  (the store learns every part's tables from the node's registry)
    from edge.store.db import open_database, write_transaction
    from edge.store.models import Study
    from sync.reports import reports_dir
    from sync.tables import Report

    open_database(data_dir)
    study_uid = generate_uid()
    sop_uid = generate_uid()
    folder = reports_dir(data_dir) / study_uid
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{sop_uid}.dcm").write_bytes(b"")  # the Part 10 file: the kiosk never reads it
    with write_transaction():
        study = Study.create(study_instance_uid=study_uid, accession_number=accession, patient_id="P1",
                             study_date=study_date, report_state="none")
        if report_text is not None or pdf is not None:
            pdf_rel = ""
            if pdf is not None:
                pdf_rel = f"{study_uid}/{sop_uid}.pdf"
                (folder / f"{sop_uid}.pdf").write_bytes(pdf)
            Report.create(
                study=study, sop_instance_uid=sop_uid,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.104.1" if pdf is not None else "1.2.840.10008.5.1.4.1.1.88.11",
                kind="pdf" if pdf is not None else "sr", text=report_text or "", pdf_path=pdf_rel,
                dicom_path=f"{study_uid}/{sop_uid}.dcm", content_datetime="20261124101500",
                reported_at="20261124101500", verification_flag="VERIFIED", completion_flag="COMPLETE",
            )
            Study.update(report_state="ready").where(Study.id == study.id).execute()
    return study_uid


def issue(data_dir: Path, accession: str, name: str, exam: str = "Chest X-ray") -> Any:
    import edge.node.parts  # noqa: F401
    from edge.store.db import open_database
    from kiosk.tickets import issue_ticket

    open_database(data_dir)
    return issue_ticket(accession, name, exam)


class KioskNode:
    """A real `edge serve kiosk` process on its own loopback port and data dir."""

    def __init__(self, where: Path, clinic_name: str = "Ikhaya Clinic", **kiosk: Any) -> None:
        where.mkdir(parents=True, exist_ok=True)
        self.tmp = where
        self.data_dir = where / "var"
        sections: dict[str, dict[str, Any]] = {
            "node": {"id": "test-node", "name": clinic_name},
            "kiosk": {"bind_address": "127.0.0.1", **kiosk},
        }
        self.config = write_config(where / "edge.toml", self.data_dir, **sections)
        self.port = int(tomllib.loads(self.config.read_text())["kiosk"]["port"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = where / "kiosk.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> KioskNode:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge", "--config", str(self.config), "serve", "kiosk"],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, cwd=self.tmp,
        )
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "edge", "--config", str(self.config), *args],
                              capture_output=True, text=True, timeout=60, check=check)
