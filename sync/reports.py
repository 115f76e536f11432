"""The report puller: brings the remote reader's report (SR or encapsulated PDF) back for the kiosk.

Timing. One poll asks the cloud about every watched study at once: a single QIDO-RS
``/instances?StudyInstanceUID=uid1,uid2,…&SOPClassUID=<report classes>`` (PS3.18 UID-list
matching), cut into several requests only to keep each URL under ``[reports]
max_url_chars``, every ``[reports] poll_interval_s`` (15 s shipped, so a report stored in
the cloud is at the kiosk well within 30 s). A study is watched from the moment all its
instances are in the cloud until ``lookback_days`` after it was received, whatever its
report state: a ready study keeps being asked about, so an amendment arrives too. What
the cloud lists is compared with what is kept, and only new instances are fetched. A
cloud that refuses list matching (a 400, or an answer that ignores the list) is detected
once, in one log line, and then polled per study on a backoff (``min_backoff_s`` …
``max_backoff_s``). :func:`check_now` puts a study in the next poll at once.

Verified only. Every report is kept, but only a *final* one is current for the patient:
an SR with ``VerificationFlag = VERIFIED`` and ``CompletionFlag = COMPLETE``, or an
encapsulated PDF. A PDF has no verification flag of its own (the Encapsulated PDF IOD has
no SR Document General module); we assume, as the regional clouds this node serves do,
that a reporting system publishes a PDF only once the reader has signed it. A cloud that
publishes draft PDFs would break that assumption and must send SRs instead. Preliminary
reports are kept for the console ("Preliminary report", :func:`preliminary_report`) and
reach the patient only with ``[kiosk] print_preliminary = true``.

Amendments. A newer final report supersedes the current one: it names the earlier in
``PredecessorDocumentsSequence``, or its verification (else content) date-time is later.
The earlier keeps ``superseded_by``; :func:`current_report` returns only the newest, so
two reports are never shown as if both current. If the replaced one had been printed
(the study's report state was "printed"), it is flagged ``amended_after_printing`` and
audited, and the study is "ready" again for the amended one.

Patient safety: a fetched instance is kept only if its StudyInstanceUID is the study
asked for (and its SOP Instance UID the instance asked for), so no patient can be shown
another patient's report; a study is made "ready" only by a final report.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from peewee import JOIN, Expression, fn
from tenacity import wait_exponential_jitter

from edge.dicom_uid import is_uid
from edge.files import fsync_dir, write_durably
from edge.outbox_bell import OutboxBell
from edge.store.const import ReportState, SyncState
from edge.store.db import write_transaction
from edge.store.models import Instance, Outbox, Study, log_event, utcnow
from edge.store.rows import rows
from sync.backoff import wait_before_attempt
from sync.dicomweb import (
    ENCAPSULATED_PDF,
    REPORT_SOP_CLASSES,
    REPORT_SR_SOP_CLASSES,
    SERIES_INSTANCE_UID,
    SOP_INSTANCE_UID,
    STUDY_INSTANCE_UID,
    DicomWebClient,
    DicomWebError,
    json_value,
    split_uid_list,
)
from sync.tables import Report, ReportPoll, ReportRetry

if TYPE_CHECKING:  # pydicom is imported where a report is read: the console and kiosk start without it
    from pydicom.dataset import Dataset

    from edge.store.walk import DecodeLimits

log = logging.getLogger(__name__)

REPORTS_DIR = "reports"
"""Under the data dir: ``reports/<study uid>/<sop uid>.dcm`` (and ``.pdf``)."""

_SR_MAX_DEPTH = 32  # a reader's report nests a few levels; deeper is no report, refused rather than cut
_MAX_TEXT_CHARS = 200_000  # ~50 printed pages: longer is no report a patient can be handed
_MAX_PREDECESSORS = 50
_ERROR_CHARS = 500
# A reader's report (an SR tree, a PDF in one element) has hundreds to a few thousand
# elements; pydicom holds ~450 bytes for each, so this keeps a hostile one under ~50 MB.
MAX_REPORT_ELEMENTS = 100_000

ReportStatus = Literal["final", "amended", "preliminary"]


@dataclass(frozen=True)
class ReportSettings:
    """How the puller paces itself; the sync service maps ``[reports]`` keys onto it."""

    lookback_days: int = 14
    poll_interval_s: float = 15.0  # [reports] poll_interval_s: one batched poll of every watched study
    min_backoff_s: float = 60.0  # per-study polling, for a cloud without UID-list matching
    max_backoff_s: float = 3600.0
    max_studies_per_round: int = 20  # per-study polling only
    max_url_chars: int = 6000  # [reports] max_url_chars: the StudyInstanceUID list of one QIDO-RS
    query_timeout_s: float = 30.0  # [reports] query_timeout_s: a QIDO-RS that hangs longer is given up
    max_report_bytes: int = 32 * 1024 * 1024  # [reports] max_report_mb: the WADO-RS body, and the report once inflated
    max_deflate_ratio: float = 50.0  # [storage] max_deflate_ratio

    @property
    def decode_limits(self) -> DecodeLimits:
        from edge.store.walk import DecodeLimits

        return DecodeLimits(self.max_report_bytes, self.max_deflate_ratio, MAX_REPORT_ELEMENTS, "[reports] max_report_mb")


@dataclass(frozen=True)
class ReportView:
    """One stored report as the kiosk, the console and the CLI see it."""

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
    reading_doctor: str = ""  # VerifyingObserverName, else the author; "^" shown as spaces
    verified_at: str = ""  # the reader's VerificationDateTime, DICOM DT ("" for a PDF, mostly)
    status: ReportStatus = "final"  # "amended": final and replaces an earlier final report
    superseded_by: str = ""  # the newer report's SOP Instance UID; "" while current

    @property
    def reported_at(self) -> dt.datetime | None:
        """When the reader signed it (else wrote it), on the reader's clock; None when the cloud did not say."""
        return parse_dicom_datetime(self.verified_at or self.content_datetime)


def reports_dir(data_dir: Path) -> Path:
    """Where fetched reports live: ``<data_dir>/reports``."""
    return Path(data_dir) / REPORTS_DIR


def is_final(kind: str, verification_flag: str, completion_flag: str) -> bool:
    """Whether a report may go to the patient: a verified, complete SR, or a PDF (see the module docstring)."""
    return kind == "pdf" or (verification_flag == "VERIFIED" and completion_flag == "COMPLETE")


def _final() -> Expression:
    return (Report.kind == "pdf") | ((Report.verification_flag == "VERIFIED") & (Report.completion_flag == "COMPLETE"))


def _newest_first() -> tuple[Any, ...]:
    return (Report.reported_at.desc(), Report.fetched_at.desc(), Report.id.desc())


def _of_study(study_uid: str) -> Any:
    return Report.select().join(Study).where(Study.study_instance_uid == study_uid)


def current_report(study_uid: str, data_dir: Path, *, print_preliminary: bool = False) -> ReportView | None:
    """The report the patient may see and print: the newest final one not superseded, or None.

    With ``print_preliminary`` (``[kiosk] print_preliminary``) a preliminary report newer
    than every final one is returned instead, marked ``status = "preliminary"``.
    """
    row = _of_study(study_uid).where(_final() & (Report.superseded_by == "")).order_by(*_newest_first()).first()
    if print_preliminary:
        prelim = _newer_preliminary(study_uid, row)
        if prelim is not None:
            return _view(prelim, study_uid, data_dir)
    return _view(row, study_uid, data_dir) if row is not None else None


def preliminary_report(study_uid: str, data_dir: Path) -> ReportView | None:
    """The newest preliminary report newer than the current final one, for the console's "Preliminary report"."""
    current = _of_study(study_uid).where(_final() & (Report.superseded_by == "")).order_by(*_newest_first()).first()
    row = _newer_preliminary(study_uid, current)
    return _view(row, study_uid, data_dir) if row is not None else None


def _newer_preliminary(study_uid: str, current: Report | None) -> Report | None:
    query = _of_study(study_uid).where(~_final())
    if current is not None:
        query = query.where(Report.reported_at > current.reported_at)
    row: Report | None = query.order_by(*_newest_first()).first()
    return row


def report_history(study_uid: str, data_dir: Path) -> list[ReportView]:
    """Every report kept for the study, newest first: current, superseded and preliminary (for the console)."""
    return [_view(row, study_uid, data_dir) for row in _of_study(study_uid).order_by(*_newest_first())]


def amendment_of(report: ReportView) -> dt.datetime | None:
    """When the report this one replaces was signed (else written or fetched): the page's
    "Amended report — replaces the report of <date>". None when it replaces nothing."""
    row = (
        Report.select()
        .where((Report.superseded_by == report.sop_instance_uid) & _final())
        .order_by(*_newest_first())
        .first()
    )
    if row is None:
        return None
    return parse_dicom_datetime(row.verified_at or row.content_datetime) or row.fetched_at


def amended_after_printing(study_uid: str) -> bool:
    """Whether a report of this study was printed and then replaced: the console's "Amended after printing"."""
    return bool(_of_study(study_uid).where(Report.amended_after_printing).exists())


def _view(row: Report, study_uid: str, data_dir: Path) -> ReportView:
    root = reports_dir(data_dir).resolve()
    final = is_final(row.kind, row.verification_flag, row.completion_flag)
    status: ReportStatus = "preliminary"
    if final:
        replaced = Report.select().where((Report.superseded_by == row.sop_instance_uid) & _final()).exists()
        status = "amended" if replaced else "final"
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
        reading_doctor=row.reading_doctor,
        verified_at=row.verified_at,
        status=status,
        superseded_by=row.superseded_by,
    )


def parse_dicom_datetime(value: str) -> dt.datetime | None:
    """A DICOM DT (or DA+TM run together) as a naive datetime; None when it is not one."""
    digits = _dt_key(value)
    if len(digits) < 8:
        return None
    digits = digits.ljust(14, "0")
    try:
        return dt.datetime.strptime(digits, "%Y%m%d%H%M%S")
    except ValueError:
        return None


def _dt_key(value: str) -> str:
    """``YYYYMMDDHHMMSS`` (or a prefix) from a DICOM DT: fractions and the UTC offset dropped."""
    match = re.match(r"^\s*(\d{8,14})", str(value or ""))
    return match.group(1) if match else ""


def check_now(study_uid: str, data_dir: Path | None = None) -> bool:
    """Staff's "Check for the report now": the next poll includes this study, and the poll starts now.

    The request is a row in the database (the console is another process under ``edge
    run`` and systemd); with ``data_dir`` the sync service is also woken through the
    outbox bell, else it sees the request at its next poll. False for an unknown study.
    """
    now = utcnow()
    with write_transaction():
        study = Study.get_or_none(Study.study_instance_uid == study_uid)
        if study is None:
            return False
        poll, _ = ReportPoll.get_or_create(study=study.id)
        ReportPoll.update(check_requested_at=now, next_poll_at=now).where(ReportPoll.id == poll.id).execute()
        log_event("report_check_requested", "", study_uid=study_uid)
    log.info("study %s: report check requested", study_uid)
    if data_dir is not None:
        OutboxBell(Path(data_dir)).ring()
    return True


def check_requested() -> bool:
    """Whether staff asked for a check that no poll has answered yet (cheap: read on every wake)."""
    return bool(ReportPoll.select().where(ReportPoll.check_requested_at.is_null(False)).exists())


def backoff_delay(attempt: int, settings: ReportSettings) -> float:
    """Seconds until a study's next per-study poll after ``attempt`` polls found nothing (or failed).

    Exponential from ``min_backoff_s``, with up to half of ``min_backoff_s`` of jitter
    so many studies (and nodes) do not poll in step, capped at ``max_backoff_s``.
    """
    wait = wait_exponential_jitter(
        multiplier=settings.min_backoff_s,
        max=settings.max_backoff_s,
        jitter=settings.min_backoff_s / 2,
        min=min(settings.min_backoff_s, settings.max_backoff_s),
    )
    return wait_before_attempt(wait, attempt)


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


def _content_lines(items: Sequence[Dataset], depth: int, level: int = 0) -> Iterator[str]:
    """``depth`` indents; ``level`` counts every nesting, printed or not, against ``_SR_MAX_DEPTH``."""
    indent = "  " * depth
    if level > _SR_MAX_DEPTH:
        raise ValueError(f"content tree nested deeper than {_SR_MAX_DEPTH} levels")
    for item in items:
        kind = str(item.get("ValueType", "")).upper()
        name = _concept_name(item)
        children = item.get("ContentSequence") or []
        if kind == "CONTAINER":
            if name:
                yield f"{indent}{name}"
            yield from _content_lines(children, depth + 1 if name else depth, level + 1)
            continue
        value = _item_value(item)
        if value is None:
            # An image or coordinate reference: nothing to read, but its children may be.
            yield from _content_lines(children, depth, level + 1)
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
        yield from _content_lines(children, depth + 1, level + 1)


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


# ---------------------------------------------------------------------- the puller


class _Unusable(Exception):
    """A fetched report that cannot be shown (unparseable, empty, not a PDF, too deep)."""


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
    reading_doctor: str = ""
    verified_at: str = ""
    predecessors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Watched:
    id: int
    study_instance_uid: str
    check_requested: bool = False
    next_poll_at: dt.datetime | None = None  # per-study polling only; None: never polled on its own


@dataclass
class _Listing:
    """What the cloud listed in one poll: report items per study asked, and whether to stop."""

    items: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    errors: dict[int, DicomWebError] = field(default_factory=dict)  # per-study polling: the study's failure
    link_down: bool = False


class ReportPuller:
    """Polls the cloud for the reports of watched studies and keeps them for the kiosk.

    Owns no session: the sync service calls :meth:`poll_due` with its client on its
    own schedule. Rounds do not overlap. ``uid_lists`` is what the cloud was found to do
    (None until asked); ``queries`` counts the QIDO-RS requests made.
    """

    def __init__(self, data_dir: Path, settings: ReportSettings | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.settings = settings or ReportSettings()
        self.root = reports_dir(self.data_dir)
        self.uid_lists: bool | None = None
        self.queries = 0
        self._round = asyncio.Lock()
        self._link_failing = ""  # the last cloud failure logged; "" while it answers

    async def poll_due(self, client: DicomWebClient) -> int:
        """One poll: ask the cloud about the watched studies, fetch what is new; returns how many reports were stored.

        Never raises for a cloud or file problem: each is one log line, and a report not
        fetched is tried again later (``ReportRetry``). A link that looks down ends the poll.
        """
        async with self._round:
            started = utcnow()
            watched = await asyncio.to_thread(self.watched_studies, started)
            if not watched:
                return 0
            if self.uid_lists is None and not await self._detect_uid_lists(client, watched):
                return 0
            listing = await self._list_together(client, watched) if self.uid_lists else None
            if listing is None:
                listing = await self._list_each(client, watched, started)
            by_id = {w.id: w for w in watched}
            stored, fetched_into = await self._fetch_new(client, listing, by_id, started)
            await asyncio.to_thread(self._after_poll, listing, by_id, fetched_into, started)
            return stored

    def watched_studies(self, now: dt.datetime | None = None) -> list[_Watched]:
        """Studies to ask about: every instance in the cloud, received within ``lookback_days``, any report state.

        Those staff asked to check come first, then the newest.
        """
        now = now or utcnow()
        any_outbox = Outbox.select(Outbox.id).join(Instance).where(Instance.study == Study.id)
        not_synced = (
            Outbox.select(Outbox.id).join(Instance).where((Instance.study == Study.id) & (Outbox.state != SyncState.SYNCED))
        )
        query = (
            Study.select(Study.id, Study.study_instance_uid, ReportPoll.check_requested_at, ReportPoll.next_poll_at)
            .join(ReportPoll, JOIN.LEFT_OUTER, on=(ReportPoll.study == Study.id))
            .where(
                (Study.received_at >= now - dt.timedelta(days=self.settings.lookback_days))
                & fn.EXISTS(any_outbox)
                & ~fn.EXISTS(not_synced)
            )
            .order_by(ReportPoll.check_requested_at.is_null(), Study.received_at.desc(), Study.id.desc())
        )
        found = [
            _Watched(int(row_id), str(uid), requested is not None, next_at)
            for row_id, uid, requested, next_at in rows(query, tuple[int, str, Any, Any])
        ]
        return [w for w in found if _is_uid(w.study_instance_uid)]

    # ------------------------------------------------------------------ asking the cloud

    async def _timed(self, job: Any) -> Any:
        """One QIDO-RS with the puller's own deadline: a cloud that hangs costs one poll, not the loop."""
        self.queries += 1
        try:
            answer = await asyncio.wait_for(job, self.settings.query_timeout_s)
        except TimeoutError:
            raise DicomWebError(
                f"no answer within {self.settings.query_timeout_s:g} s ([reports] query_timeout_s)",
                status=None, transient=True,
            ) from None
        if self._link_failing:
            self._link_failing = ""
            log.info("report poll: the cloud answers again")
        return answer

    async def _detect_uid_lists(self, client: DicomWebClient, watched: Sequence[_Watched]) -> bool:
        """Ask once whether the cloud does UID-list matching; False when the poll cannot go on."""
        try:
            self.uid_lists = await self._timed(client.matches_uid_lists([w.study_instance_uid for w in watched[:2]]))
        except DicomWebError as exc:
            self._link_error(exc, "UID-list check")
            return False
        if self.uid_lists:
            log.info("report poll: the cloud does UID-list matching: one QIDO-RS per poll for all watched studies")
        else:
            self._refuse_lists("it does not answer a StudyInstanceUID list with those studies")
        return True

    def _refuse_lists(self, why: str) -> None:
        self.uid_lists = False
        log.warning(
            "report poll: the cloud does not do UID-list matching (%s): asking about each study on its own, "
            "every %g s at first, backing off to %g s", why, self.settings.min_backoff_s, self.settings.max_backoff_s,
        )

    def _link_error(self, exc: DicomWebError, what: str) -> None:
        """One warning when the cloud stops answering (or answers an error), then quiet (debug) until that changes."""
        if self._link_failing == str(exc) or (exc.transient and self._link_failing):
            log.debug("report poll: %s failed again: %s", what, exc)
            return
        self._link_failing = str(exc)
        log.warning("report poll: %s failed, trying again at the next poll: %s", what, exc)

    async def _list_together(self, client: DicomWebClient, watched: Sequence[_Watched]) -> _Listing | None:
        """Every watched study's report instances in as few QIDO-RS as URL length allows; None: fall back."""
        listing = _Listing()
        by_uid = {w.study_instance_uid: w for w in watched}
        for chunk in split_uid_list(list(by_uid), self.settings.max_url_chars):
            try:
                items = await self._timed(client.find_reports_of_studies(chunk))
            except DicomWebError as exc:
                if exc.status in (400, 414):
                    hint = "" if exc.status == 400 else "; lower [reports] max_url_chars"
                    self._refuse_lists(f"HTTP {exc.status} to a StudyInstanceUID list{hint}")
                    return None
                self._link_error(exc, f"report query of {len(chunk)} studies")
                listing.link_down = True
                return listing
            asked = set(chunk)
            found: dict[int, list[dict[str, Any]]] = {by_uid[uid].id: [] for uid in chunk}
            for item in items:
                study_uid = str(json_value(item, STUDY_INSTANCE_UID, "") or "")
                if study_uid not in asked:
                    self._refuse_lists("its answer holds studies that were not asked for")
                    return None
                found[by_uid[study_uid].id].append(item)
            listing.items.update(found)
        return listing

    async def _list_each(self, client: DicomWebClient, watched: Sequence[_Watched], now: dt.datetime) -> _Listing:
        """Per-study polling, for a cloud without UID-list matching: the due studies, each on its own backoff."""
        listing = _Listing()
        due = [w for w in watched if w.check_requested or w.next_poll_at is None or w.next_poll_at <= now]
        due.sort(key=lambda w: (not w.check_requested, w.next_poll_at or dt.datetime.min))
        for study in due[: self.settings.max_studies_per_round]:
            try:
                listing.items[study.id] = await self._timed(client.find_report_instances(study.study_instance_uid))
            except DicomWebError as exc:
                listing.errors[study.id] = exc
                self._link_error(exc, f"report query of study {study.study_instance_uid}")
                if exc.transient and exc.status is None:
                    listing.link_down = True
                    break
        return listing

    # ------------------------------------------------------------------ fetching what is new

    async def _fetch_new(
        self, client: DicomWebClient, listing: _Listing, by_id: dict[int, _Watched], now: dt.datetime
    ) -> tuple[int, set[int]]:
        """Fetch the listed instances not kept yet (nor waiting to be tried again); returns (stored, studies stored into)."""
        sops = [str(json_value(i, SOP_INSTANCE_UID, "") or "") for items in listing.items.values() for i in items]
        known = await asyncio.to_thread(_known_reports, sops)
        waiting = await asyncio.to_thread(_retry_later, sops, now)
        stored = 0
        stored_into: set[int] = set()
        for study_id, items in listing.items.items():
            study = by_id[study_id]
            for item in items:
                sop_uid = str(json_value(item, SOP_INSTANCE_UID, "") or "")
                series_uid = str(json_value(item, SERIES_INSTANCE_UID, "") or "")
                if sop_uid in known or (sop_uid in waiting and not study.check_requested):
                    continue
                if not (_is_uid(sop_uid) and _is_uid(series_uid)):
                    if sop_uid[:64] not in waiting:
                        log.error("study %s: cloud listed a report without usable UIDs, skipped", study.study_instance_uid)
                    await asyncio.to_thread(
                        self._retry, study, sop_uid[:64], "cloud listed a report without usable UIDs", True, None,
                    )
                    continue
                try:
                    fetched = await self._fetch(client, study.study_instance_uid, series_uid, sop_uid)
                except DicomWebError as exc:
                    log.warning("report %s of study %s not retrieved: %s", sop_uid, study.study_instance_uid, exc)
                    await asyncio.to_thread(self._retry, study, sop_uid, str(exc), not exc.transient, exc.retry_after)
                    if exc.transient and exc.status is None:
                        return stored, stored_into  # the link is down: the rest would fail too
                    continue
                except _Foreign as exc:
                    await asyncio.to_thread(self._retry, study, sop_uid, str(exc), True, None, exc.other_study)
                    continue
                except _Unusable as exc:
                    log.error("report %s of study %s is not shown: %s", sop_uid, study.study_instance_uid, exc)
                    await asyncio.to_thread(self._retry, study, sop_uid, f"report {sop_uid}: {exc}", True, None)
                    continue
                if await asyncio.to_thread(self._store, study, fetched):
                    stored += 1
                    stored_into.add(study.id)
        return stored, stored_into

    async def _fetch(self, client: DicomWebClient, study_uid: str, series_uid: str, sop_uid: str) -> _Fetched:
        folder = self.root / study_uid
        await asyncio.to_thread(_make_dir, folder, self.root)
        dest = folder / f"{sop_uid}.dcm"
        await client.retrieve_instance(study_uid, series_uid, sop_uid, dest, max_bytes=self.settings.max_report_bytes)
        return await asyncio.to_thread(self._read_report, study_uid, sop_uid, dest)

    def _read_report(self, study_uid: str, sop_uid: str, path: Path) -> _Fetched:
        """Check the fetched file is this study's report and turn it into what the kiosk shows."""
        from pydicom import dcmread
        from pydicom.errors import InvalidDicomError

        from edge.store.walk import Malformed, OverLimit, walk_instance

        try:  # before pydicom holds it whole: a deflated or flooded file could cost any amount
            walk_instance(path, self.settings.decode_limits)
        except (OverLimit, Malformed) as exc:
            path.unlink(missing_ok=True)
            raise _Unusable(f"not kept: {exc.reason}") from None
        except OSError as exc:
            raise _Unusable(f"cannot read the fetched file: {exc}") from None
        try:
            ds = dcmread(path)
        except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, AttributeError, OSError,
                RecursionError) as exc:
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
        try:
            content_datetime = f"{ds.get('ContentDate', '') or ''}{ds.get('ContentTime', '') or ''}".strip()[:32]
            doctor, verified_at = _reading_doctor(ds)
            predecessors = _predecessors(ds)
        except (AttributeError, KeyError, TypeError, ValueError, IndexError, RecursionError) as exc:
            raise _Unusable(f"report header unreadable: {type(exc).__name__}: {exc}") from None
        dicom_rel = f"{study_uid}/{sop_uid}.dcm"
        if sop_class in REPORT_SR_SOP_CLASSES:
            try:
                text = sr_text(ds)
            except (AttributeError, KeyError, TypeError, ValueError, IndexError, RecursionError) as exc:
                raise _Unusable(f"SR content tree unreadable: {exc}") from None
            if not text.strip():
                raise _Unusable("SR holds no readable text")
            if len(text) > _MAX_TEXT_CHARS:
                raise _Unusable(f"SR text is {len(text)} characters, over {_MAX_TEXT_CHARS}: no report to print")
            return _Fetched(
                sop_uid, sop_class, "sr", text, "", dicom_rel,
                _clean(ds.get("CompletionFlag", ""))[:16], _clean(ds.get("VerificationFlag", ""))[:16],
                content_datetime, doctor, verified_at, predecessors,
            )
        assert sop_class == ENCAPSULATED_PDF
        try:
            pdf = pdf_bytes(ds)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise _Unusable(f"encapsulated document unreadable: {type(exc).__name__}: {exc}") from None
        if not pdf.startswith(b"%PDF"):
            raise _Unusable("encapsulated document is not a PDF (no %PDF header)")
        pdf_rel = f"{study_uid}/{sop_uid}.pdf"
        write_durably(self.root / pdf_rel, pdf)
        return _Fetched(sop_uid, sop_class, "pdf", "", pdf_rel, dicom_rel, "", "", content_datetime,
                        doctor, verified_at, predecessors)

    # ------------------------------------------------------------------ recording

    def _store(self, study: _Watched, report: _Fetched) -> bool:
        """Keep one fetched report and settle which report is current, in one transaction."""
        now = utcnow()
        uid = study.study_instance_uid
        with write_transaction():
            row = Study.get_or_none(Study.id == study.id)
            if row is None:
                log.info("study %s is gone: its report is not kept", uid)
                return False
            if Report.get_or_none(Report.sop_instance_uid == report.sop_instance_uid) is not None:
                return False
            before = _current_row(study.id)
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
                reading_doctor=report.reading_doctor,
                verified_at=report.verified_at,
                reported_at=_dt_key(report.verified_at or report.content_datetime),
                predecessors=" ".join(report.predecessors),
            )
            ReportRetry.delete().where(ReportRetry.sop_instance_uid == report.sop_instance_uid).execute()
            outcome = _settle(row, before, now)
        final = is_final(report.kind, report.verification_flag, report.completion_flag)
        log.info(
            "report %s of study %s stored (%s, %s)", report.sop_instance_uid, uid, report.kind,
            "final" if final else f"preliminary: {report.verification_flag or '-'}/{report.completion_flag or '-'}",
        )
        if outcome:
            log.info("study %s: %s", uid, outcome)
        return True

    def _retry(
        self, study: _Watched, sop_uid: str, reason: str, permanent: bool, retry_after: float | None,
        other_study: str | None = None,
    ) -> None:
        """Remember a report not kept, and when to try it again: the maximum backoff when the same answer would come."""
        now = utcnow()
        with write_transaction():
            if Study.get_or_none(Study.id == study.id) is None:
                return
            row = ReportRetry.get_or_none(ReportRetry.sop_instance_uid == sop_uid)
            attempts = (row.attempts + 1) if row is not None else 1
            delay = self.settings.max_backoff_s if permanent else backoff_delay(attempts, self.settings)
            if retry_after:
                delay = min(max(delay, retry_after), self.settings.max_backoff_s)
            values = {"attempts": attempts, "next_try_at": now + dt.timedelta(seconds=delay), "reason": reason[:_ERROR_CHARS]}
            if row is None:
                ReportRetry.create(study=study.id, sop_instance_uid=sop_uid, **values)
            else:
                ReportRetry.update(**values).where(ReportRetry.id == row.id).execute()
            if other_study is not None:
                log_event("report_refused", f"the cloud's file belongs to study {other_study or '(none)'}",
                          study_uid=study.study_instance_uid, sop_uid=sop_uid)

    def _after_poll(self, listing: _Listing, by_id: dict[int, _Watched], stored_into: set[int], now: dt.datetime) -> None:
        """Clear answered "check now" requests; in per-study polling, set each study's next poll."""
        answered = [i for i in listing.items if by_id[i].check_requested]
        per_study = self.uid_lists is False
        if not answered and not per_study:
            return
        with write_transaction():
            if answered:
                ReportPoll.update(check_requested_at=None).where(
                    ReportPoll.study.in_(answered) & (ReportPoll.check_requested_at <= now)
                ).execute()
            if not per_study:
                return
            for study_id in [*listing.items, *listing.errors]:
                if Study.get_or_none(Study.id == study_id) is None:
                    continue
                poll, _ = ReportPoll.get_or_create(study=study_id)
                error = listing.errors.get(study_id)
                attempts = 0 if study_id in stored_into else poll.attempts + 1
                if error is not None and not error.transient:
                    delay = self.settings.max_backoff_s
                else:
                    delay = backoff_delay(max(1, attempts), self.settings)
                    if error is not None and error.retry_after:
                        delay = min(max(delay, error.retry_after), self.settings.max_backoff_s)
                ReportPoll.update(
                    attempts=attempts, next_poll_at=now + dt.timedelta(seconds=delay), last_polled_at=now,
                    last_error=str(error)[:_ERROR_CHARS] if error is not None else "",
                ).where(ReportPoll.id == poll.id).execute()


def _current_row(study_id: int) -> Report | None:
    row: Report | None = (
        Report.select().where((Report.study == study_id) & _final() & (Report.superseded_by == ""))
        .order_by(*_newest_first()).first()
    )
    return row


def _settle(study: Study, before: Report | None, now: dt.datetime) -> str:
    """Decide the study's current report after one was added (inside the caller's transaction).

    The current one is the newest final report that no other final report names as its
    predecessor; every other final one is superseded by it. Returns what changed, for the log.
    """
    finals = list(Report.select().where((Report.study == study.id) & _final()))
    if not finals:
        return ""
    named = {uid for r in finals for uid in r.predecessors.split()}
    candidates = [r for r in finals if r.sop_instance_uid not in named] or finals
    current = max(candidates, key=lambda r: (r.reported_at, r.fetched_at, r.id))
    Report.update(superseded_by="", superseded_at=None).where(Report.id == current.id).execute()
    Report.update(superseded_by=current.sop_instance_uid, superseded_at=now).where(
        (Report.study == study.id) & _final() & (Report.superseded_by == "") & (Report.id != current.id)
    ).execute()
    uid = study.study_instance_uid
    if before is None:
        Study.update(report_state=ReportState.READY, updated_at=now).where(
            (Study.id == study.id) & (Study.report_state == ReportState.NONE)
        ).execute()
        log_event("report_ready", current.kind, study_uid=uid, sop_uid=current.sop_instance_uid)
        return "report ready"
    if before.id == current.id:
        return ""
    printed = study.report_state == ReportState.PRINTED
    log_event("report_amended", f"replaces {before.sop_instance_uid}", study_uid=uid, sop_uid=current.sop_instance_uid)
    if printed:
        Report.update(amended_after_printing=True).where(Report.id == before.id).execute()
        log_event("report_amended_after_printing", f"printed report {before.sop_instance_uid} replaced",
                  study_uid=uid, sop_uid=current.sop_instance_uid)
    Study.update(report_state=ReportState.READY, updated_at=now).where(Study.id == study.id).execute()
    return f"amended report {current.sop_instance_uid} replaces {before.sop_instance_uid}" + (
        " (the replaced one was printed)" if printed else ""
    )


def _reading_doctor(ds: Dataset) -> tuple[str, str]:
    """(name, VerificationDateTime) of the latest verifying observer; else the author's name and ""."""
    from pydicom.dataset import Dataset

    observers = [o for o in (ds.get("VerifyingObserverSequence") or [])[:20] if isinstance(o, Dataset)]
    if observers:
        latest = max(observers, key=lambda o: _dt_key(str(o.get("VerificationDateTime", "") or "")))
        name = _person(latest.get("VerifyingObserverName"))
        when = _clean(latest.get("VerificationDateTime", ""))[:32]
        if name or when:
            return name, when
    for author in (ds.get("AuthorObserverSequence") or [])[:20]:
        if isinstance(author, Dataset) and (name := _person(author.get("PersonName"))):
            return name, ""
    return _person(ds.get("ContentCreatorName")), ""


def _person(value: Any) -> str:
    return _clean(str(value or "").replace("^", " "))[:128]


def _predecessors(ds: Dataset) -> list[str]:
    """SOP Instance UIDs the report says it replaces (PredecessorDocumentsSequence, PS3.3 C.17.2)."""
    found: list[str] = []
    for study in (ds.get("PredecessorDocumentsSequence") or [])[:_MAX_PREDECESSORS]:
        for series in (study.get("ReferencedSeriesSequence") or [])[:_MAX_PREDECESSORS]:
            for ref in (series.get("ReferencedSOPSequence") or [])[:_MAX_PREDECESSORS]:
                uid = str(ref.get("ReferencedSOPInstanceUID", "") or "")
                if _is_uid(uid) and uid not in found:
                    found.append(uid)
    return found[:_MAX_PREDECESSORS]


def _known_reports(sop_uids: list[str]) -> set[str]:
    wanted = [u for u in sop_uids if u]
    if not wanted:
        return set()
    query = Report.select(Report.sop_instance_uid).where(Report.sop_instance_uid.in_(wanted))
    return {uid for (uid,) in rows(query, tuple[str])}


def _retry_later(sop_uids: list[str], now: dt.datetime) -> set[str]:
    wanted = [u[:64] for u in sop_uids if u]
    if not wanted:
        return set()
    query = (
        ReportRetry.select(ReportRetry.sop_instance_uid)
        .where(ReportRetry.sop_instance_uid.in_(wanted) & (ReportRetry.next_try_at > now))
    )
    return {uid for (uid,) in rows(query, tuple[str])}


def _is_uid(value: str) -> bool:
    """A DICOM UID, safe to use as a file name (the cloud's answer is not trusted with paths)."""
    return is_uid(value)


def _make_dir(folder: Path, root: Path) -> None:
    new_root = not root.exists()
    new = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    if new_root:
        fsync_dir(root.parent)
    if new:
        fsync_dir(root)
