"""Helpers the benchmarks share: synthetic DX images, commands, processes, namespaces, the node.

Why this exists: ``ingest.py`` and ``upload.py`` both build DR images, run peers and the
node as process groups inside private network namespaces, and read the node's studies.
Keeping one copy here means a fix (a process that lingers, a namespace left behind) reaches
every benchmark at once. It imports nothing heavy at module level: ``upload.py`` re-runs
itself as its delay proxy, which should stay small.

Importing it also puts the checkout on ``sys.path``, so a benchmark can use the test
helpers (``tests.conftest`` …) when they are the same thing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

EDGE = Path(sys.executable).parent / "edge"  # the venv's console script
ORTHANC = "/usr/sbin/Orthanc"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_ROWS = DX_COLS = 3000  # a DR detector's size: ~18 MB at 16 bits allocated
STOP_TIMEOUT_S = 15.0


class BenchError(Exception):
    """A step of a benchmark could not be run: a real failure, not a missed goal."""


# --------------------------------------------------------------------------- images


def dx_dataset(
    pixels: bytes,
    study_uid: str,
    series_uid: str,
    number: int,
    *,
    patient_name: str,
    patient_id: str,
    accession: str,
    study_id: str,
    bits_stored: int,
) -> Dataset:
    """A DX For Presentation image (3000x3000, MONOCHROME2, explicit VR LE) with a fresh SOP UID.

    Everything a DR sends that the receivers index (patient, study, series, instance
    number) is set, so every peer accepts and files it as a real image would be.
    ``pixels`` is the raw 16-bit buffer, shared or not as the caller likes.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.AccessionNumber = accession
    ds.StudyID = study_id
    ds.StudyDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.ContentTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.Modality = "DX"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "Clinic Edge bench"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = DX_ROWS, DX_COLS
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.PixelData = pixels
    return ds


# --------------------------------------------------------------------------- commands and processes


def run_cmd(cmd: Sequence[str], timeout: float, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a short command to completion, bounded; a timeout, a missing program or (with ``check``)
    a non-zero exit becomes a ``BenchError`` that quotes the command and the end of its output."""
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(cmd[:6])} timed out after {timeout:.0f} s") from None
    except OSError as exc:
        raise BenchError(f"{cmd[0]}: {exc}") from None
    if check and proc.returncode != 0:
        raise BenchError(f"{' '.join(cmd[:8])} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-400:]}")
    return proc


def spawn(cmd: Sequence[str], log_path: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a long-running process, output appended to ``log_path``, in its own process group.

    The group lets ``stop`` reach forked children too (``storescp --fork``); ``ip netns
    exec`` execs in place, so the PID is the program's own and can be sampled.
    """
    with open(log_path, "ab") as log:
        return subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=cwd, start_new_session=True)  # fmt: skip


def stop(proc: subprocess.Popen[bytes], first: signal.Signals = signal.SIGTERM) -> None:
    """Signal the process group (``first``), then SIGKILL it if it lingers: every wait is bounded,
    and the SIGKILL also reaps children left in the group."""
    if proc.poll() is None:
        _signal_group(proc, first)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc, signal.SIGKILL)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(f"warning: process {proc.pid} did not exit after SIGKILL", file=sys.stderr)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log, headed by its name, for a ``FAILED`` report ("" if none)."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    return f"--- {path.name}\n" + "\n".join(text) if text else ""


def interrupt_on_sigterm() -> None:
    """Make SIGTERM raise KeyboardInterrupt, so every ``finally`` runs: peers stopped, temp dirs
    and namespaces removed."""

    def _interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)


def abort_status(exc: BenchError | KeyboardInterrupt) -> int:
    """Say why a benchmark stopped early, and return its exit status (1 failed, 130 interrupted)."""
    if isinstance(exc, KeyboardInterrupt):
        print("bench: interrupted", file=sys.stderr)
        return 130
    print(f"bench: error: {exc}", file=sys.stderr)
    return 1


# --------------------------------------------------------------------------- network namespaces


def netns_add(name: str) -> None:
    """Create network namespace ``name`` with its loopback up (removed again if that fails).

    Peers and senders run in private namespaces so that nothing listens on the host's
    interfaces and, with a veth pair, so a link can be shaped without touching the host.
    """
    run_cmd(["ip", "netns", "add", name], timeout=10)
    try:
        run_cmd(["ip", "-n", name, "link", "set", "lo", "up"], timeout=10)
    except BenchError:
        netns_delete(name)
        raise


def netns_delete(name: str) -> None:
    """Remove a namespace (and so its end of any veth pair); errors ignored, as in cleanup."""
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def netns_exec(name: str) -> list[str]:
    """Command prefix that runs a program inside namespace ``name``."""
    return ["ip", "netns", "exec", name]


# --------------------------------------------------------------------------- peers and the node


def spawn_orthanc(prefix: Sequence[str], work: Path, config: dict[str, Any], log_path: Path) -> subprocess.Popen[bytes]:
    """Write ``config`` to ``work/orthanc.json`` and start Orthanc on it (``prefix``: a namespace)."""
    (work / "orthanc.json").write_text(json.dumps(config, indent=2))
    return spawn([*prefix, ORTHANC, str(work / "orthanc.json")], log_path, cwd=work)


def write_edge_toml(path: Path, sections: dict[str, dict[str, Any]]) -> None:
    """Write an ``edge.toml`` from ``{section: {key: value}}``, values as TOML via JSON literals.

    Each benchmark spells out its node's whole configuration here rather than taking the
    tests' defaults, so a change to a test fixture cannot move a benchmark's figures.
    """
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")


def edge_studies(config: Path) -> list[dict[str, Any]]:
    """``edge studies --json`` for the node of ``config``: what it holds and each study's sync state."""
    out = run_cmd([str(EDGE), "--config", str(config), "studies", "--json"], timeout=60).stdout
    return json.loads(out)  # type: ignore[no-any-return]
