"""The report puller: brings the remote reader's report (SR or encapsulated PDF) back for the kiosk.

A study is asked about once all its instances are in the cloud and until its report
has arrived, each study on its own backoff so an unread study costs one small QIDO-RS
query now and then, not a stream of them. A fetched report is kept as the Part 10
file plus what the kiosk needs (the SR as plain text, the PDF as a file), and only
then does the study become ``report_state = "ready"``.

Patient safety: a fetched instance is kept only if its StudyInstanceUID is the study
asked for, so no patient can be shown another patient's report.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peewee import JOIN, fn
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from tenacity import RetryCallState, wait_exponential_jitter

from edge.store.const import ReportState, SyncState
from edge.store.db import write_transaction
from edge.store.models import Instance, Outbox, Study, log_event, utcnow
from edge.store.rows import rows
from edge.store.spool import fsync_dir
from edge.store.walk import DecodeLimits, Malformed, OverLimit, walk_instance
from sync.dicomweb import (
    ENCAPSULATED_PDF,
    REPORT_SOP_CLASSES,
    REPORT_SR_SOP_CLASSES,
    SERIES_INSTANCE_UID,
    SOP_INSTANCE_UID,
    DicomWebClient,
    DicomWebError,
    json_value,
)
from sync.tables import Report, ReportPoll

log = logging.getLogger(__name__)
log.addHandler(logging.NullHandler())

REPORTS_DIR = "reports"
"""Under the data dir: ``reports/<study uid>/<sop uid>.dcm`` (and ``.pdf``)."""

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_SR_MAX_DEPTH = 32  # deeper content trees are not a reader's report; stop rather than recurse forever
_ERROR_CHARS = 500
# A reader's report (an SR tree, a PDF in one element) has hundreds to a few thousand
# elements; pydicom holds ~450 bytes for each, so this keeps a hostile one under ~50 MB.
MAX_REPORT_ELEMENTS = 100_000


@dataclass(frozen=True)
class ReportSettings:
    """How the puller paces itself; the sync service maps ``[reports]`` keys onto it."""

    lookback_days: int = 14
    min_backoff_s: float = 60.0
    max_backoff_s: float = 3600.0
    max_studies_per_round: int = 20
    max_report_bytes: int = 32 * 1024 * 1024  # [reports] max_report_mb: the WADO-RS body, and the report once inflated
    max_deflate_ratio: float = 50.0  # [storage] max_deflate_ratio

    @property
    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(self.max_report_bytes, self.max_deflate_ratio, MAX_REPORT_ELEMENTS, "[reports] max_report_mb")


@dataclass(frozen=True)
class ReportView:
    """One stored report as the kiosk and the CLI see it."""

    study_instance_uid: str
    sop_instance_uid: str
    kind: str  # "sr" | "pdf"
    text: str  # the SR as plain text; "" for a PDF
    pdf_path: Path | None  # absolute; None for an SR
    dicom_path: Path  # absolute: the Part 10 file as fetched
    completion_flag: str
    verification_flag: str
    content_datetime: str  # the reader's ContentDate + ContentTime, DICOM DA+TM
    fetched_at: dt.datetime


def reports_dir(data_dir: Path) -> Path:
    """Where fetched reports live: ``<data_dir>/reports``."""
    return Path(data_dir) / REPORTS_DIR


def report_for_study(study_uid: str, data_dir: Path) -> ReportView | None:
    """The study's report for the kiosk: the newest by the reader's content date, then by fetch.

    None when the study has no report (yet) or is unknown.
    """
    row = (
        Report.select(Report, Study.study_instance_uid)
        .join(Study)
        .where(Study.study_instance_uid == study_uid)
        .order_by(Report.content_datetime.desc(), Report.fetched_at.desc(), Report.id.desc())
        .first()
    )
    if row is None:
        return None
    root = reports_dir(data_dir).resolve()
    return ReportView(
        study_instance_uid=study_uid,
        sop_instance_uid=row.sop_instance_uid,
        kind=row.kind,
        text=row.text,
        pdf_path=root / row.pdf_path if row.pdf_path else None,
        dicom_path=root / row.dicom_path,
        completion_flag=row.completion_flag,
        verification_flag=row.verification_flag,
        content_datetime=row.content_datetime,
        fetched_at=row.fetched_at,
    )


def backoff_delay(attempt: int, settings: ReportSettings) -> float:
    """Seconds until the next poll after ``attempt`` polls found nothing (or failed).

    Exponential from ``min_backoff_s``, with up to half of ``min_backoff_s`` of jitter
    so many studies (and nodes) do not poll in step, capped at ``max_backoff_s``.
    """
    wait = wait_exponential_jitter(
        multiplier=settings.min_backoff_s,
        max=settings.max_backoff_s,
        jitter=settings.min_backoff_s / 2,
        min=min(settings.min_backoff_s, settings.max_backoff_s),
    )
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = max(1, attempt)
    return float(wait(state))


# ---------------------------------------------------------------------- SR as text


def sr_text(ds: Dataset) -> str:
    """The SR content tree as plain text the kiosk can print as "the reader's report".

    The document title first, then one line per content item: ``Heading: value`` for
    TEXT, CODE, NUM (with units), DATE/TIME/PNAME; a CONTAINER's heading on its own
    line with its content indented beneath. Image and coordinate references are left out.
    """
    lines: list[str] = []
    title = _concept_name(ds)
    if title:
        lines.append(title)
    lines.extend(_content_lines(ds.get("ContentSequence") or [], 0))
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines)


def _concept_name(item: Dataset) -> str:
    codes = item.get("ConceptNameCodeSequence") or []
    return _clean(codes[0].get("CodeMeaning", "")) if codes else ""


def _code_meaning(codes: Sequence[Dataset] | None) -> str:
    if not codes:
        return ""
    code = codes[0]
    return _clean(code.get("CodeMeaning", "") or code.get("CodeValue", ""))


def _clean(value: Any) -> str:
    return " ".join(str(value).split()) if value is not None else ""


def _item_value(item: Dataset) -> str | None:
    """A content item's value as text; None for items with no readable value (references)."""
    kind = str(item.get("ValueType", "")).upper()
    if kind == "TEXT":
        return str(item.get("TextValue", "") or "")
    if kind == "CODE":
        return _code_meaning(item.get("ConceptCodeSequence"))
    if kind == "NUM":
        measured = item.get("MeasuredValueSequence") or []
        if not measured:
            return _code_meaning(item.get("NumericValueQualifierCodeSequence")) or "no value"
        number = _clean(measured[0].get("NumericValue", ""))
        units = _code_meaning(measured[0].get("MeasurementUnitsCodeSequence"))
        return f"{number} {units}".strip() if units not in ("", "1", "no units") else number
    if kind == "DATE":
        return _clean(item.get("Date", ""))
    if kind == "TIME":
        return _clean(item.get("Time", ""))
    if kind == "DATETIME":
        return _clean(item.get("DateTime", ""))
    if kind == "PNAME":
        return _clean(item.get("PersonName", "")).replace("^", " ").strip()
    return None


def _content_lines(items: Sequence[Dataset], depth: int) -> Iterator[str]:
    indent = "  " * depth
    if depth > _SR_MAX_DEPTH:
        return
    for item in items:
        kind = str(item.get("ValueType", "")).upper()
        name = _concept_name(item)
        children = item.get("ContentSequence") or []
        if kind == "CONTAINER":
            if name:
                yield f"{indent}{name}"
            yield from _content_lines(children, depth + 1 if name else depth)
            continue
        value = _item_value(item)
        if value is None:
            # An image or coordinate reference: nothing to read, but its children may be.
            yield from _content_lines(children, depth)
            continue
        text_lines = [line.rstrip() for line in value.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
        while text_lines and not text_lines[-1]:
            text_lines.pop()
        while text_lines and not text_lines[0]:
            text_lines.pop(0)
        if not text_lines:
            text_lines = [""]
        if len(text_lines) == 1:
            yield f"{indent}{name}: {text_lines[0]}" if name else f"{indent}{text_lines[0]}"
        else:
            if name:
                yield f"{indent}{name}:"
            sub = indent + ("  " if name else "")
            yield from (f"{sub}{line}" if line else "" for line in text_lines)
        yield from _content_lines(children, depth + 1)


# ---------------------------------------------------------------------- PDF


def pdf_bytes(ds: Dataset) -> bytes:
    """The encapsulated document without DICOM's even-length pad byte."""
    doc = bytes(ds.get("EncapsulatedDocument", b"") or b"")
    length = ds.get("EncapsulatedDocumentLength")
    if isinstance(length, int) and 0 < length <= len(doc):
        return doc[:length]
    if len(doc) % 2 == 0 and doc.endswith((b"\0", b" ")) and doc[:-1].rstrip().endswith(b"%%EOF"):
        return doc[:-1]
    return doc


def _write_durably(path: Path, data: bytes) -> None:
    """Temp file, fsync, rename, fsync the directory: whole or absent after a power cut."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


# ---------------------------------------------------------------------- the puller


class _Unusable(Exception):
    """A fetched report that cannot be shown (unparseable, empty, not a PDF)."""


class _Foreign(Exception):
    """A fetched instance that is not the report asked for (another study, another instance)."""

    def __init__(self, reason: str, other_study: str) -> None:
        super().__init__(reason)
        self.other_study = other_study


@dataclass
class _Fetched:
    sop_instance_uid: str
    sop_class_uid: str
    kind: str
    text: str
    pdf_path: str
    dicom_path: str
    completion_flag: str
    verification_flag: str
    content_datetime: str


@dataclass(frozen=True)
class _DueStudy:
    id: int
    study_instance_uid: str


@dataclass
class _Outcome:
    """What one study's poll came to."""

    fetched: list[_Fetched] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    transient: DicomWebError | None = None
    permanent: bool = False
    refused: list[tuple[str, str]] = field(default_factory=list)  # (sop uid, the study it was in)


class ReportPuller:
    """Polls the cloud for the reports of fully synced studies and keeps them for the kiosk.

    Owns no session: the sync service calls :meth:`poll_due` with its client on its
    own schedule. Rounds do not overlap.
    """

    def __init__(self, data_dir: Path, settings: ReportSettings | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.settings = settings or ReportSettings()
        self.root = reports_dir(self.data_dir)
        self._round = asyncio.Lock()

    async def poll_due(self, client: DicomWebClient) -> int:
        """Ask the cloud about each study whose poll is due; returns how many reports were newly stored.

        Never raises for a cloud or file problem: each lands in the study's
        ``ReportPoll.last_error``. A link that looks down ends the round early.
        """
        async with self._round:
            due = await asyncio.to_thread(self.due_studies)
            stored = 0
            for study in due:
                try:
                    outcome = await self._poll_study(client, study)
                    stored += await asyncio.to_thread(self._record, study, outcome)
                except Exception as exc:  # a bug or a local disk/database fault: this study only
                    log.exception("report poll of study %s failed", study.study_instance_uid)
                    await self._record_safely(study, _Outcome(errors=[f"{type(exc).__name__}: {exc}"], permanent=True))
                    continue
                if outcome.transient is not None and outcome.transient.status is None:
                    log.info("cloud unreachable (%s): report round ends early", outcome.transient)
                    break
            return stored

    def due_studies(self, now: dt.datetime | None = None) -> list[_DueStudy]:
        """Studies to ask about now: fully synced, no report yet, recent, and past their backoff."""
        now = now or utcnow()
        settings = self.settings
        any_outbox = Outbox.select(Outbox.id).join(Instance).where(Instance.study == Study.id)
        not_synced = (
            Outbox.select(Outbox.id).join(Instance).where((Instance.study == Study.id) & (Outbox.state != SyncState.SYNCED))
        )
        query = (
            Study.select(Study.id, Study.study_instance_uid)
            .join(ReportPoll, JOIN.LEFT_OUTER, on=(ReportPoll.study == Study.id))
            .where(
                (Study.report_state == ReportState.NONE)
                & (Study.received_at >= now - dt.timedelta(days=settings.lookback_days))
                & fn.EXISTS(any_outbox)
                & ~fn.EXISTS(not_synced)
                & (ReportPoll.id.is_null() | (ReportPoll.next_poll_at <= now))
            )
            .order_by(fn.COALESCE(ReportPoll.next_poll_at, Study.received_at), Study.id)
            .limit(settings.max_studies_per_round)
        )
        return [_DueStudy(int(row_id), str(uid)) for row_id, uid in rows(query, tuple[int, str])]

    # ------------------------------------------------------------------ one study

    async def _poll_study(self, client: DicomWebClient, study: _DueStudy) -> _Outcome:
        outcome = _Outcome()
        study_uid = study.study_instance_uid
        try:
            items = await client.find_report_instances(study_uid)
        except DicomWebError as exc:
            _note_error(outcome, exc)
            log.warning("report query for study %s failed: %s", study_uid, exc)
            return outcome
        known = await asyncio.to_thread(_known_reports, [str(json_value(i, SOP_INSTANCE_UID, "")) for i in items])
        for item in items:
            sop_uid = str(json_value(item, SOP_INSTANCE_UID, "") or "")
            series_uid = str(json_value(item, SERIES_INSTANCE_UID, "") or "")
            if sop_uid in known:
                continue
            if not (_is_uid(sop_uid) and _is_uid(series_uid)):
                outcome.errors.append(f"cloud listed a report without usable UIDs ({sop_uid!r}, {series_uid!r})")
                outcome.permanent = True
                log.error("study %s: cloud listed a report without usable UIDs, skipped", study_uid)
                continue
            try:
                outcome.fetched.append(await self._fetch(client, study_uid, series_uid, sop_uid))
            except DicomWebError as exc:
                _note_error(outcome, exc)
                log.warning("report %s of study %s not retrieved: %s", sop_uid, study_uid, exc)
                if exc.transient and exc.status is None:
                    break  # the link is down: the rest would fail too
            except _Foreign as exc:
                outcome.errors.append(str(exc))
                outcome.refused.append((sop_uid, exc.other_study))
                outcome.permanent = True
            except _Unusable as exc:
                outcome.errors.append(f"report {sop_uid}: {exc}")
                outcome.permanent = True
                log.error("report %s of study %s is unusable, kept for inspection: %s", sop_uid, study_uid, exc)
        return outcome

    async def _fetch(self, client: DicomWebClient, study_uid: str, series_uid: str, sop_uid: str) -> _Fetched:
        folder = self.root / study_uid
        await asyncio.to_thread(_make_dir, folder, self.root)
        dest = folder / f"{sop_uid}.dcm"
        await client.retrieve_instance(study_uid, series_uid, sop_uid, dest, max_bytes=self.settings.max_report_bytes)
        return await asyncio.to_thread(self._read_report, study_uid, sop_uid, dest)

    def _read_report(self, study_uid: str, sop_uid: str, path: Path) -> _Fetched:
        """Check the fetched file is this study's report and turn it into what the kiosk shows."""
        try:  # before pydicom holds it whole: a deflated or flooded file could cost any amount
            walk_instance(path, self.settings.decode_limits)
        except (OverLimit, Malformed) as exc:
            path.unlink(missing_ok=True)
            raise _Unusable(f"not kept: {exc.reason}") from None
        except OSError as exc:
            raise _Unusable(f"cannot read the fetched file: {exc}") from None
        try:
            ds = dcmread(path)
        except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
            raise _Unusable(f"cannot parse the fetched file: {type(exc).__name__}: {exc}") from None
        got_study = str(ds.get("StudyInstanceUID", "") or "")
        got_sop = str(ds.get("SOPInstanceUID", "") or "")
        if got_study != study_uid:
            path.unlink(missing_ok=True)
            log.error(
                "refused report %s for study %s: the cloud's file belongs to study %s; discarded",
                sop_uid, study_uid, got_study or "(none)",
            )
            raise _Foreign(f"report {sop_uid} refused: it belongs to study {got_study or '(none)'}", got_study)
        if got_sop != sop_uid:
            path.unlink(missing_ok=True)
            log.error("refused report %s for study %s: the cloud sent instance %s; discarded", sop_uid, study_uid, got_sop)
            raise _Foreign(f"report {sop_uid} refused: the cloud sent instance {got_sop or '(none)'}", got_study)
        sop_class = str(ds.get("SOPClassUID", "") or "")
        if sop_class not in REPORT_SOP_CLASSES:
            # e.g. a dose SR the cloud listed without its SOP class: not a reader's report.
            path.unlink(missing_ok=True)
            raise _Unusable(f"SOP class {sop_class or '(none)'} is not a report")
        content_datetime = f"{ds.get('ContentDate', '') or ''}{ds.get('ContentTime', '') or ''}".strip()[:32]
        dicom_rel = f"{study_uid}/{sop_uid}.dcm"
        if sop_class in REPORT_SR_SOP_CLASSES:
            try:
                text = sr_text(ds)
            except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
                raise _Unusable(f"SR content tree unreadable: {type(exc).__name__}: {exc}") from None
            if not text.strip():
                raise _Unusable("SR holds no readable text")
            return _Fetched(
                sop_uid, sop_class, "sr", text, "", dicom_rel,
                _clean(ds.get("CompletionFlag", ""))[:16], _clean(ds.get("VerificationFlag", ""))[:16],
                content_datetime,
            )
        assert sop_class == ENCAPSULATED_PDF
        try:
            pdf = pdf_bytes(ds)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise _Unusable(f"encapsulated document unreadable: {type(exc).__name__}: {exc}") from None
        if not pdf.startswith(b"%PDF"):
            raise _Unusable("encapsulated document is not a PDF (no %PDF header)")
        pdf_rel = f"{study_uid}/{sop_uid}.pdf"
        _write_durably(self.root / pdf_rel, pdf)
        return _Fetched(sop_uid, sop_class, "pdf", "", pdf_rel, dicom_rel, "", "", content_datetime)

    # ------------------------------------------------------------------ recording

    def _record(self, study: _DueStudy, outcome: _Outcome) -> int:
        """Store the fetched reports and make the study ready, or set its next poll. One transaction."""
        now = utcnow()
        uid = study.study_instance_uid
        if outcome.fetched and outcome.transient is None:
            with write_transaction():
                if Study.get_or_none(Study.id == study.id) is None:
                    log.info("study %s is gone: its report is not kept", uid)
                    return 0
                stored = 0
                for report in outcome.fetched:
                    if Report.get_or_none(Report.sop_instance_uid == report.sop_instance_uid) is not None:
                        continue
                    Report.create(
                        study=study.id,
                        sop_instance_uid=report.sop_instance_uid,
                        sop_class_uid=report.sop_class_uid,
                        kind=report.kind,
                        text=report.text,
                        pdf_path=report.pdf_path,
                        dicom_path=report.dicom_path,
                        completion_flag=report.completion_flag,
                        verification_flag=report.verification_flag,
                        content_datetime=report.content_datetime,
                        fetched_at=now,
                    )
                    stored += 1
                Study.update(report_state=ReportState.READY, updated_at=now).where(
                    (Study.id == study.id) & (Study.report_state == ReportState.NONE)
                ).execute()
                ReportPoll.delete().where(ReportPoll.study == study.id).execute()
                kinds = ",".join(sorted({r.kind for r in outcome.fetched}))
                log_event("report_ready", f"{stored} report(s): {kinds}", study_uid=uid)
            for report in outcome.fetched:
                log.info("report %s of study %s stored (%s)", report.sop_instance_uid, uid, report.kind)
            log.info("study %s: report ready", uid)
            return stored
        self._back_off(study, outcome, now)
        return 0

    def _back_off(self, study: _DueStudy, outcome: _Outcome, now: dt.datetime) -> None:
        error = "; ".join(outcome.errors)[:_ERROR_CHARS]
        with write_transaction():
            if Study.get_or_none(Study.id == study.id) is None:
                return
            poll, _ = ReportPoll.get_or_create(study=study.id)
            attempts = poll.attempts + 1
            if outcome.permanent and outcome.transient is None:
                delay = self.settings.max_backoff_s
            else:
                delay = backoff_delay(attempts, self.settings)
                if outcome.transient is not None and outcome.transient.retry_after:
                    delay = min(max(delay, outcome.transient.retry_after), self.settings.max_backoff_s)
            ReportPoll.update(
                attempts=attempts,
                next_poll_at=now + dt.timedelta(seconds=delay),
                last_polled_at=now,
                last_error=error,
            ).where(ReportPoll.id == poll.id).execute()
            for sop_uid, other_study in outcome.refused:
                log_event(
                    "report_refused", f"the cloud's file belongs to study {other_study or '(none)'}",
                    study_uid=study.study_instance_uid, sop_uid=sop_uid,
                )
        if not error:
            log.debug("study %s: no report yet, next poll in %.0f s", study.study_instance_uid, delay)

    async def _record_safely(self, study: _DueStudy, outcome: _Outcome) -> None:
        try:
            await asyncio.to_thread(self._back_off, study, outcome, utcnow())
        except Exception:
            log.exception("could not record the failed report poll of study %s", study.study_instance_uid)


def _note_error(outcome: _Outcome, exc: DicomWebError) -> None:
    outcome.errors.append(str(exc))
    if exc.transient:
        outcome.transient = exc
    else:
        outcome.permanent = True


def _known_reports(sop_uids: list[str]) -> set[str]:
    wanted = [u for u in sop_uids if u]
    if not wanted:
        return set()
    query = Report.select(Report.sop_instance_uid).where(Report.sop_instance_uid.in_(wanted))
    return {uid for (uid,) in rows(query, tuple[str])}


def _is_uid(value: str) -> bool:
    """A DICOM UID, safe to use as a file name (the cloud's answer is not trusted with paths)."""
    return 0 < len(value) <= 64 and bool(_UID.match(value))


def _make_dir(folder: Path, root: Path) -> None:
    new_root = not root.exists()
    new = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    if new_root:
        fsync_dir(root.parent)
    if new:
        fsync_dir(root)
