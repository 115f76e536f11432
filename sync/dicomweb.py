"""DICOMweb client for the regional cloud PACS: STOW-RS up, QIDO-RS and WADO-RS for reports back.

Any DICOMweb server is a valid cloud, so this module keeps to PS3.18 and reads
responses defensively (missing Content-Type, filters a server ignores, empty
sequences). It owns no session and no retry policy: the caller passes one
``aiohttp.ClientSession`` with an explicit ``ClientTimeout`` and decides what to
do with a :class:`DicomWebError` from its ``transient`` and ``body_sent`` flags.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import aiohttp

from edge.files import publish

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
MULTIPART_DICOM = 'multipart/related; type="application/dicom"'
# "transfer-syntax=*" asks for the stored bytes as they are (PS3.18 8.7.3.5.2), so a
# retrieved instance is not transcoded on the way back.
MULTIPART_DICOM_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'

CHUNK_SIZE = 64 * 1024
"""Bytes read from disk (and paced) per step of a streamed body."""

_ERROR_BODY_CHARS = 300

MAX_JSON_BYTES = 8 * 1024 * 1024
"""Largest QIDO-RS or STOW-RS answer read: parsed JSON takes ~10x its size in Python, and
8 MB is tens of thousands of instances. A longer answer is refused, not read."""
_ERROR_BODY_BYTES = 64 * 1024  # of an error answer only the start is shown to anyone

# DICOM JSON tags used here (PS3.18 Annex F: 8 upper-case hex digits).
STUDY_INSTANCE_UID = "0020000D"
SERIES_INSTANCE_UID = "0020000E"
SOP_CLASS_UID = "00080016"
SOP_INSTANCE_UID = "00080018"
MODALITY = "00080060"
CONTENT_DATE = "00080023"
CONTENT_TIME = "00080033"
COMPLETION_FLAG = "0040A491"
VERIFICATION_FLAG = "0040A493"
RETRIEVE_URL = "00081190"
FAILURE_REASON = "00081197"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
WARNING_REASON = "00081196"
OTHER_FAILURES_SEQUENCE = "0008119A"
REFERENCED_SOP_INSTANCE_UID = "00081155"

# SOP classes a reader's report arrives as. Deliberately not "every SR": a DR sends
# its own X-Ray Radiation Dose SR (…88.67, modality SR), which is not a report.
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
EXTENSIBLE_SR = "1.2.840.10008.5.1.4.1.1.88.35"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
REPORT_SR_SOP_CLASSES = frozenset(
    {BASIC_TEXT_SR, ENHANCED_SR, COMPREHENSIVE_SR, COMPREHENSIVE_3D_SR, EXTENSIBLE_SR}
)
REPORT_SOP_CLASSES = REPORT_SR_SOP_CLASSES | {ENCAPSULATED_PDF}
REPORT_MODALITIES = frozenset({"SR", "DOC"})

# Fields the report puller needs from QIDO, asked for explicitly because a server's
# default instance-level fields need not include series-level ones.
_REPORT_FIELDS = (
    SERIES_INSTANCE_UID, SOP_CLASS_UID, SOP_INSTANCE_UID, MODALITY,
    CONTENT_DATE, CONTENT_TIME, COMPLETION_FLAG, VERIFICATION_FLAG,
)

# PS3.4 / PS3.18 status codes seen in FailureReason and WarningReason.
_STATUS_TEXT = {
    0x0110: "Processing failure",
    0x0111: "Duplicate SOP instance",
    0x0117: "Invalid object instance",
    0x0122: "SOP class not supported",
    0x0124: "Not authorized",
    0xA700: "Out of resources",
    0xA770: "Out of resources: SOP instance already stored with different content",
    0xA900: "Data set does not match SOP class",
    0xB000: "Coercion of data elements",
    0xB006: "Elements discarded",
    0xB007: "Data set does not match SOP class",
    0xC000: "Cannot understand",
    0xC122: "Referenced transfer syntax not supported",
}


def status_text(code: int) -> str:
    """A DICOM status as ``0x0110 Processing failure``, so quarantine reasons are readable."""
    name = _STATUS_TEXT.get(code)
    if name is None:
        for mask, family in ((0xFF00, {0xA700: "Out of resources", 0xA900: "Data set does not match SOP class"}),
                             (0xF000, {0xC000: "Cannot understand"})):
            name = family.get(code & mask)
            if name:
                break
    return f"0x{code:04X} {name or 'Unknown status'}"


def json_values(item: Mapping[str, Any], tag: str) -> list[Any]:
    """All values of one attribute of a DICOM JSON dataset ([] when absent or empty)."""
    element = item.get(tag.upper())
    if not isinstance(element, Mapping):
        return []
    values = element.get("Value")
    return list(values) if isinstance(values, list) else []


def json_value(item: Mapping[str, Any], tag: str, default: Any = None) -> Any:
    """The first value of one attribute of a DICOM JSON dataset, e.g. ``json_value(item, "0020000D")``.

    Person names come back as their DICOM JSON object (``{"Alphabetic": ...}``).
    """
    values = json_values(item, tag)
    return values[0] if values else default


def is_report_instance(item: Mapping[str, Any]) -> bool:
    """Whether a QIDO result looks like a reader's report (SR document or encapsulated PDF).

    The SOP class decides when the server returns it; the modality only when it does not.
    """
    sop_class = json_value(item, SOP_CLASS_UID)
    if sop_class:
        return str(sop_class) in REPORT_SOP_CLASSES
    return str(json_value(item, MODALITY, "")).upper() in REPORT_MODALITIES


@dataclass
class StowResult:
    """What the cloud said about each instance of one STOW-RS request.

    Instances sent but in neither ``stored`` nor ``failed`` were not accounted for
    by the server; treat them as not stored.
    """

    stored: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    http_status: int = 200
    failure_codes: dict[str, int] = field(default_factory=dict)
    bytes_sent: int = 0


class DicomWebError(Exception):
    """A DICOMweb request that did not produce a usable answer.

    Attributes
    ----------
    status : HTTP status, or None when no response arrived.
    reason : human-readable cause, safe to show an operator (no patient data).
    transient : True when the same request may succeed later (5xx, 408, 429,
        timeouts, refused/reset connections); False for other 4xx and for
        answers that will not change on retry.
    body_sent : True when the whole request body had been handed to the
        connection before the failure: the server may have stored it, so check
        with QIDO-RS before re-sending.
    retry_after : seconds from a ``Retry-After`` header, when the server gave one.
    partial : for a STOW-RS error whose body still named instances, what it said.
    """

    def __init__(
        self,
        reason: str,
        *,
        status: int | None = None,
        transient: bool,
        body_sent: bool = False,
        retry_after: float | None = None,
        partial: StowResult | None = None,
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.transient = transient
        self.body_sent = body_sent
        self.retry_after = retry_after
        self.partial = partial

    def __str__(self) -> str:
        prefix = f"HTTP {self.status}: " if self.status is not None else ""
        return f"{prefix}{self.reason}"


def is_transient_status(status: int) -> bool:
    """5xx, 408 Request Timeout and 429 Too Many Requests may succeed on retry; other 4xx won't."""
    return status >= 500 or status in (408, 429)


class TokenBucket:
    """Paces bytes to a rate, shared by every upload that must fit under one bandwidth cap.

    Debt-based: a caller takes its chunk at once and sleeps off any deficit, so
    concurrent uploads together stay at ``rate_bps`` without a lock.
    """

    def __init__(self, rate_bps: int, burst_bytes: int | None = None) -> None:
        if rate_bps <= 0:
            raise ValueError("rate_bps must be positive")
        self.rate_bps = rate_bps
        self.burst_bytes = burst_bytes if burst_bytes is not None else max(CHUNK_SIZE, rate_bps // 10)
        self._tokens = float(self.burst_bytes)
        self._last = time.monotonic()

    async def take(self, nbytes: int) -> None:
        """Wait until ``nbytes`` may go on the wire."""
        now = time.monotonic()
        self._tokens = min(float(self.burst_bytes), self._tokens + (now - self._last) * self.rate_bps)
        self._last = now
        self._tokens -= nbytes
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self.rate_bps)


class _BodyProgress:
    """How far a streamed request body got, to tell an ambiguous failure from a clean one."""

    def __init__(self) -> None:
        self.sent = 0
        self.complete = False
        self.local_error: OSError | None = None


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare from PACS, and the caller backs off anyway


def _short(raw: bytes) -> str:
    """An error body as one short line for an operator: a JSON error's message, else its start."""
    data = _load_json(raw)
    if isinstance(data, dict):
        for key in ("Message", "message", "error", "Details", "detail"):
            if isinstance(data.get(key), str) and data[key].strip():
                return " ".join(data[key].split())[:_ERROR_BODY_CHARS]
    text = raw[:_ERROR_BODY_CHARS].decode("utf-8", "replace").strip()
    return " ".join(text.split())


def _load_json(raw: bytes) -> Any:
    """Parse a body as JSON whatever its Content-Type (Orthanc sends 409s without one)."""
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def parse_stow_response(data: Any, http_status: int, warning_headers: Iterable[str] = ()) -> StowResult | None:
    """Read a STOW-RS DICOM JSON response; None when it is not one.

    An empty FailedSOPSequence (as Orthanc sends on success) is not a failure.
    """
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    if not isinstance(data, dict):
        return None
    if REFERENCED_SOP_SEQUENCE not in data and FAILED_SOP_SEQUENCE not in data:
        return None
    result = StowResult(http_status=http_status)
    for item in json_values(data, REFERENCED_SOP_SEQUENCE):
        if not isinstance(item, Mapping):
            continue
        uid = json_value(item, REFERENCED_SOP_INSTANCE_UID)
        if not uid:
            continue
        result.stored.add(str(uid))
        warning = json_value(item, WARNING_REASON)
        if isinstance(warning, int):
            result.warnings.append(f"{uid}: {status_text(warning)}")
    for item in json_values(data, FAILED_SOP_SEQUENCE):
        if not isinstance(item, Mapping):
            continue
        uid = json_value(item, REFERENCED_SOP_INSTANCE_UID)
        code = json_value(item, FAILURE_REASON)
        reason = status_text(code) if isinstance(code, int) else "failed without a FailureReason"
        if not uid:
            result.warnings.append(f"unidentified instance failed: {reason}")
            continue
        result.stored.discard(str(uid))
        result.failed[str(uid)] = reason
        if isinstance(code, int):
            result.failure_codes[str(uid)] = code
    for item in json_values(data, OTHER_FAILURES_SEQUENCE):
        if isinstance(item, Mapping):
            code = json_value(item, FAILURE_REASON)
            result.warnings.append(f"other failure: {status_text(code) if isinstance(code, int) else 'unspecified'}")
    result.warnings.extend(f"Warning header: {w}" for w in warning_headers)
    return result


class DicomWebClient:
    """One cloud PACS's DICOMweb API (STOW-RS, QIDO-RS, WADO-RS) over a caller's session.

    ``headers`` go on every request (e.g. ``Authorization``). ``bandwidth`` is a
    :class:`TokenBucket` shared by all uploads through this client: the node's cap.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        headers: Mapping[str, str] | None = None,
        *,
        bandwidth: TokenBucket | None = None,
    ) -> None:
        self._session = session
        self.base_url = base_url.rstrip("/")
        self._headers = dict(headers or {})
        self._bandwidth = bandwidth

    # ------------------------------------------------------------------ STOW-RS

    async def stow(
        self,
        files: Sequence[Path],
        study_uid: str | None = None,
        *,
        rate_limit_bps: int | None = None,
        on_file_bytes: Callable[[int, int], None] | None = None,
    ) -> StowResult:
        """Upload Part 10 files in one multipart request, streamed from disk.

        ``study_uid`` posts to ``/studies/{study}`` so the server rejects instances of
        another study. ``rate_limit_bps`` caps this request on top of the client's
        shared ``bandwidth``. ``on_file_bytes(index, sent)`` hears, on the loop, after each
        chunk handed to the connection, how many bytes of ``files[index]`` are gone.

        Returns
        -------
        StowResult for HTTP 200 (all stored), 202 (some failed or warnings) and
        409 (failed; the reasons are in ``failed``). Read the sets, not the status:
        Orthanc answers a partial success with 409, not 202.

        Raises
        ------
        DicomWebError
            any other status, an unreadable response, or a transport failure.
        OSError
            a local file could not be read, or changed size while being sent.
        """
        if not files:
            return StowResult()
        paths = [Path(p) for p in files]
        sizes = [p.stat().st_size for p in paths]
        boundary = f"edge-{uuid.uuid4().hex}"
        heads = [
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii") for _ in paths
        ]
        tail = f"\r\n--{boundary}--\r\n".encode("ascii")
        separator = b"\r\n"
        total = sum(sizes) + sum(len(h) for h in heads) + len(separator) * (len(paths) - 1) + len(tail)
        pacers = [b for b in (self._bandwidth, TokenBucket(rate_limit_bps) if rate_limit_bps else None) if b]
        progress = _BodyProgress()
        url = f"{self.base_url}/studies" + (f"/{_segment(study_uid)}" if study_uid else "")
        headers = {
            **self._headers,
            "Content-Type": f"{MULTIPART_DICOM}; boundary={boundary}",
            "Accept": DICOM_JSON,
            "Content-Length": str(total),
        }
        started = time.monotonic()
        body = _multipart_body(paths, sizes, heads, separator, tail, pacers, progress, on_file_bytes)
        try:
            async with self._session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
                # Cut short, an answer does not parse: ambiguous, and the QIDO-RS check decides.
                json_answer = resp.status in (200, 202, 409)
                raw = await _read_capped(resp, MAX_JSON_BYTES if json_answer else _ERROR_BODY_BYTES, "STOW-RS", truncate=True)
                status = resp.status
                warning_headers = resp.headers.getall("Warning", [])
                retry_after = _retry_after(resp.headers)
                location = resp.headers.get("Location", "?")
                http_reason = resp.reason or ""
        except (TimeoutError, aiohttp.ClientError) as exc:
            if progress.local_error is not None:
                raise progress.local_error from exc
            error = _transport_error(exc, progress.complete, "STOW-RS")
            log.warning(
                "STOW-RS of %d instance(s) (study %s) failed after %d of %d bytes: %s (body sent: %s)",
                len(paths), study_uid or "-", progress.sent, total, error.reason, error.body_sent,
            )
            raise error from exc
        finally:
            try:
                await body.aclose()
            except RuntimeError:
                pass  # still being written by a connection that is closing: it closes its file
        elapsed = time.monotonic() - started
        result = parse_stow_response(_load_json(raw), status, warning_headers)
        if result is not None:
            result.bytes_sent = progress.sent
        if status in (200, 202, 409) and result is not None:
            log.info(
                "STOW-RS study %s: %d stored, %d failed, %d warning(s), HTTP %d, %d bytes in %.2fs",
                study_uid or "-", len(result.stored), len(result.failed), len(result.warnings),
                status, progress.sent, elapsed,
            )
            for uid, reason in result.failed.items():
                log.warning("STOW-RS rejected instance %s: %s", uid, reason)
            return result
        if 200 <= status < 300:
            # Success without a response we can read: the server probably stored
            # everything, but only QIDO-RS can say so. Ambiguous, hence body_sent.
            reason = f"STOW-RS answered {status} without a DICOM JSON response"
            transient = True
        elif 300 <= status < 400:
            reason = f"STOW-RS was redirected ({status}) to {location}: fix the cloud URL"
            transient = False
        elif result is not None:
            reason = (
                f"STOW-RS refused the request: {len(result.stored)} stored, {len(result.failed)} failed"
                + "".join(f"; {r}" for r in sorted(set(result.failed.values())))
            )
            transient = is_transient_status(status)
        else:
            reason = f"STOW-RS failed: {_short(raw) or http_reason or 'no body'}"
            transient = is_transient_status(status)
        log.warning(
            "STOW-RS of %d instance(s) (study %s): HTTP %d, %s", len(paths), study_uid or "-", status, reason
        )
        raise DicomWebError(
            reason, status=status, transient=transient, body_sent=progress.complete,
            retry_after=retry_after, partial=result,
        )

    # ------------------------------------------------------------------ QIDO-RS

    async def find_instances(self, study_uid: str, **query: str | int | Sequence[str]) -> list[dict[str, Any]]:
        """QIDO-RS instances of one study; keyword filters are attribute keywords or tags.

        A list value repeats the parameter (``includefield=[...]``). No match (204 or
        an empty body) is ``[]``.

        Raises
        ------
        DicomWebError
            on any non-2xx status, an unreadable body, or a transport failure.
        """
        params: list[tuple[str, str]] = []
        for key, value in query.items():
            if isinstance(value, (list, tuple)):
                params.extend((key, str(v)) for v in value)
            else:
                params.append((key, str(value)))
        url = f"{self.base_url}/studies/{_segment(study_uid)}/instances"
        data = await self._get_json(url, params, "QIDO-RS")
        if data is None:
            return []
        if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
            raise DicomWebError("QIDO-RS answer is not a DICOM JSON array", status=200, transient=False)
        log.debug("QIDO-RS study %s %s: %d instance(s)", study_uid, params, len(data))
        return data

    async def instance_exists(self, study_uid: str, sop_uid: str) -> bool:
        """Whether the cloud holds this instance: the check after an ambiguous upload failure."""
        items = await self.find_instances(study_uid, SOPInstanceUID=sop_uid, includefield=SOP_INSTANCE_UID)
        # Compare rather than trust the filter: a server may ignore a key it does not support.
        return any(json_value(item, SOP_INSTANCE_UID) == sop_uid for item in items)

    async def existing_instances(self, study_uid: str, sop_uids: Iterable[str]) -> set[str]:
        """Which of these instances the cloud holds, in one query of the whole study.

        One request whatever the batch size, and no reliance on UID-list matching,
        which not every server implements.
        """
        wanted = set(sop_uids)
        if not wanted:
            return set()
        items = await self.find_instances(study_uid, includefield=SOP_INSTANCE_UID)
        return {str(uid) for item in items if (uid := json_value(item, SOP_INSTANCE_UID)) in wanted}

    async def find_report_instances(self, study_uid: str) -> list[dict[str, Any]]:
        """The reader's reports in a cloud study: SR documents and encapsulated PDFs.

        Three narrow queries (Modality=SR, Modality=DOC, SOPClassUID in the report
        classes) rather than one list match, since ``Modality=SR\\DOC`` is not
        understood everywhere (Orthanc 1.10 returns nothing). A query the server
        rejects outright is skipped while another answers; results are filtered
        here too, which drops e.g. the DR's own radiation dose SR.
        """
        queries: list[dict[str, str | Sequence[str]]] = [
            {"Modality": "SR", "includefield": list(_REPORT_FIELDS)},
            {"Modality": "DOC", "includefield": list(_REPORT_FIELDS)},
            {"SOPClassUID": ",".join(sorted(REPORT_SOP_CLASSES)), "includefield": list(_REPORT_FIELDS)},
        ]
        answers = await asyncio.gather(
            *(self.find_instances(study_uid, **q) for q in queries), return_exceptions=True
        )
        errors = [a for a in answers if isinstance(a, BaseException)]
        for error in errors:
            if not isinstance(error, DicomWebError) or error.transient or len(errors) == len(answers):
                raise error
            log.warning("QIDO-RS report query for study %s rejected, skipped: %s", study_uid, error)
        reports: dict[str, dict[str, Any]] = {}
        for answer in answers:
            if isinstance(answer, BaseException):
                continue
            for item in answer:
                uid = json_value(item, SOP_INSTANCE_UID)
                if uid and is_report_instance(item):
                    reports.setdefault(str(uid), item)
        log.debug("study %s: %d report instance(s) in the cloud", study_uid, len(reports))
        return list(reports.values())

    async def find_reports_of_studies(self, study_uids: Sequence[str]) -> list[dict[str, Any]]:
        """The reader's reports in many cloud studies at once: one QIDO-RS with UID-list matching.

        ``/instances?StudyInstanceUID=uid1,uid2,…&SOPClassUID=<report classes>`` (PS3.18
        8.3.4.1, PS3.4 C.2.2.2.2). Results are filtered here too (a server may ignore the
        SOP class list); each keeps its StudyInstanceUID, which the caller must check
        against what it asked. Keep the list short enough: see :func:`split_uid_list`.

        Raises
        ------
        DicomWebError
            as :meth:`find_instances` (a 400 from a server without list matching too).
        """
        if not study_uids:
            return []
        params = [
            ("StudyInstanceUID", ",".join(study_uids)),
            ("SOPClassUID", ",".join(sorted(REPORT_SOP_CLASSES))),
            *(("includefield", tag) for tag in (STUDY_INSTANCE_UID, *_REPORT_FIELDS)),
        ]
        data = await self._get_json(f"{self.base_url}/instances", params, "QIDO-RS")
        if data is None:
            return []
        if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
            raise DicomWebError("QIDO-RS answer is not a DICOM JSON array", status=200, transient=False)
        reports = [item for item in data if json_value(item, SOP_INSTANCE_UID) and is_report_instance(item)]
        log.debug("QIDO-RS reports of %d studies: %d instance(s)", len(study_uids), len(reports))
        return reports

    async def matches_uid_lists(self, study_uids: Sequence[str]) -> bool:
        """Whether the server does UID-list matching, asked with studies it is known to hold.

        ``/studies?StudyInstanceUID=a,b`` (``a,a`` for one study) must answer exactly
        those studies. A 400, an answer with other studies (the list ignored) or none
        (the list taken as one literal UID) is "no".

        Raises
        ------
        DicomWebError
            when the answer says nothing either way: a transient status or transport failure.
        """
        asked = list(dict.fromkeys(study_uids))[:2]
        if not asked:
            raise DicomWebError("no study to ask about", status=None, transient=True)
        listed = asked if len(asked) > 1 else asked * 2
        params = [("StudyInstanceUID", ",".join(listed)), ("includefield", STUDY_INSTANCE_UID)]
        try:
            data = await self._get_json(f"{self.base_url}/studies", params, "QIDO-RS")
        except DicomWebError as exc:
            if exc.transient:
                raise
            return False
        got = {str(json_value(item, STUDY_INSTANCE_UID, "")) for item in data or [] if isinstance(item, dict)}
        return got == set(asked)

    # ------------------------------------------------------------------ WADO-RS

    async def retrieve_instance(
        self, study_uid: str, series_uid: str, sop_uid: str, dest: Path, max_bytes: int | None = None
    ) -> Path:
        """Fetch one instance as a Part 10 file at ``dest``, streamed and fsynced.

        Written to ``dest.tmp`` first and renamed, so ``dest`` is either whole or absent.
        At most ``max_bytes`` are taken (None: no cap): a cloud sending more is refused
        before the disk fills, never read into memory.

        Raises
        ------
        DicomWebError
            any non-200 status, a response that is not one DICOM part, one over
            ``max_bytes`` (not transient: the same answer would come again), or a
            transport failure.
        """
        dest = Path(dest)
        tmp = dest.with_name(dest.name + ".tmp")
        url = (
            f"{self.base_url}/studies/{_segment(study_uid)}/series/{_segment(series_uid)}"
            f"/instances/{_segment(sop_uid)}"
        )
        try:
            for accept in (MULTIPART_DICOM_AS_STORED, MULTIPART_DICOM):
                async with self._session.get(url, headers={**self._headers, "Accept": accept}) as resp:
                    if resp.status == 406 and accept == MULTIPART_DICOM_AS_STORED:
                        continue  # a server that only serves its default transfer syntax
                    if resp.status != 200:
                        raw = await _read_capped(resp, _ERROR_BODY_BYTES, "WADO-RS", truncate=True)
                        raise DicomWebError(
                            f"WADO-RS failed: {_short(raw) or resp.reason or 'no body'}",
                            status=resp.status, transient=is_transient_status(resp.status),
                            retry_after=_retry_after(resp.headers),
                        )
                    written = await _save_instance(resp, tmp, max_bytes)
                    break
        except (TimeoutError, aiohttp.ClientError) as exc:
            tmp.unlink(missing_ok=True)
            raise _transport_error(exc, False, "WADO-RS") from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        await asyncio.to_thread(publish, tmp, dest)
        log.info("WADO-RS instance %s of study %s: %d bytes", sop_uid, study_uid, written)
        return dest

    # ------------------------------------------------------------------ helpers

    async def _get_json(self, url: str, params: list[tuple[str, str]], what: str) -> Any:
        headers = {**self._headers, "Accept": DICOM_JSON}
        try:
            async with self._session.get(url, params=params, headers=headers) as resp:
                ok = resp.status < 300
                raw = await _read_capped(resp, MAX_JSON_BYTES if ok else _ERROR_BODY_BYTES, what, truncate=not ok)
                if resp.status == 204:
                    return None
                if resp.status != 200:
                    raise DicomWebError(
                        f"{what} failed: {_short(raw) or resp.reason or 'no body'}",
                        status=resp.status, transient=is_transient_status(resp.status),
                        retry_after=_retry_after(resp.headers),
                    )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _transport_error(exc, False, what) from exc
        if not raw.strip():
            return None
        data = _load_json(raw)
        if data is None:
            raise DicomWebError(f"{what} answer is not JSON: {_short(raw)}", status=200, transient=False)
        return data


def split_uid_list(uids: Sequence[str], max_chars: int) -> list[list[str]]:
    """UIDs in order, cut into lists whose comma-joined text stays within ``max_chars``.

    Keeps each QIDO-RS URL short enough for any proxy or server in the way (many refuse
    a request line past 8 KiB); one UID longer than the budget still gets its own list.
    """
    lists: list[list[str]] = []
    current: list[str] = []
    used = 0
    for uid in uids:
        cost = len(uid) + (1 if current else 0)
        if current and used + cost > max_chars:
            lists.append(current)
            current, used = [], 0
            cost = len(uid)
        current.append(uid)
        used += cost
    if current:
        lists.append(current)
    return lists


async def _read_capped(resp: aiohttp.ClientResponse, limit: int, what: str, truncate: bool = False) -> bytes:
    """The answer's body, at most ``limit`` bytes: with ``truncate`` its start, else over it is refused.

    ``resp.read()`` would hold whatever the server sends; a cloud (or whoever answers on
    its address) sending gigabytes must not take the node's memory.
    """
    declared = resp.content_length
    if declared is not None and declared > limit and not truncate:
        raise DicomWebError(f"{what} answer of {declared} bytes is over the {limit} byte limit: not read",
                            status=resp.status, transient=False)
    body = bytearray()
    while len(body) <= limit:
        chunk = await resp.content.read(min(CHUNK_SIZE, limit + 1 - len(body)))
        if not chunk:
            return bytes(body)
        body += chunk
    if truncate:
        return bytes(body[:limit])
    raise DicomWebError(f"{what} answer is over the {limit} byte limit: not read", status=resp.status, transient=False)


def _segment(uid: str) -> str:
    """A UID as one URL path segment (UIDs are digits and dots; anything else is escaped)."""
    return quote(uid.strip(), safe="")


def _transport_error(exc: BaseException, body_sent: bool, what: str) -> DicomWebError:
    """Classify a failure with no HTTP answer. All are transient: the link, not the data."""
    if isinstance(exc, TimeoutError):
        reason = f"{what} timed out" + (" waiting for the answer" if body_sent else "")
    elif isinstance(exc, aiohttp.ClientConnectorCertificateError):
        reason = f"{what} TLS certificate not trusted: {exc.certificate_error}"
    elif isinstance(exc, aiohttp.ClientConnectorError):
        reason = f"{what} could not connect to {exc.host}:{exc.port}: {exc.os_error.strerror or exc.os_error}"
    elif isinstance(exc, aiohttp.ServerDisconnectedError):
        reason = f"{what} connection closed by the server"
    elif isinstance(exc, aiohttp.ClientPayloadError):
        reason = f"{what} answer cut short: {exc}"
    else:
        reason = f"{what} {type(exc).__name__}: {exc}"
    return DicomWebError(reason, status=None, transient=True, body_sent=body_sent)


async def _multipart_body(
    paths: Sequence[Path],
    sizes: Sequence[int],
    heads: Sequence[bytes],
    separator: bytes,
    tail: bytes,
    pacers: Sequence[TokenBucket],
    progress: _BodyProgress,
    on_file_bytes: Callable[[int, int], None] | None = None,
) -> AsyncGenerator[bytes, None]:
    """The STOW-RS body, one chunk at a time, so a study is never held in memory.

    Sets ``progress.complete`` only once the last chunk has been written to the
    connection (the writer asks for more after writing the tail).
    """

    async def emit(chunk: bytes) -> bytes:
        for pacer in pacers:
            await pacer.take(len(chunk))
        progress.sent += len(chunk)
        return chunk

    for index, (path, size, head) in enumerate(zip(paths, sizes, heads)):
        yield await emit((separator if index else b"") + head)
        try:
            handle: BinaryIO = await asyncio.to_thread(open, path, "rb")
        except OSError as exc:
            progress.local_error = exc
            raise
        try:
            remaining = size
            while remaining > 0:
                chunk = await asyncio.to_thread(handle.read, min(CHUNK_SIZE, remaining))
                if not chunk:
                    progress.local_error = OSError(f"{path} shrank while being sent ({size} bytes expected)")
                    raise progress.local_error
                remaining -= len(chunk)
                yield await emit(chunk)
                if on_file_bytes is not None:
                    on_file_bytes(index, size - remaining)
        finally:
            await asyncio.to_thread(handle.close)
    yield await emit(tail)
    progress.complete = True


async def _save_instance(resp: aiohttp.ClientResponse, tmp: Path, max_bytes: int | None = None) -> int:
    """Stream the first DICOM part of a WADO-RS answer into ``tmp``; returns its size.

    Stops, and raises, as soon as more than ``max_bytes`` have come (the caller removes ``tmp``).
    """
    limit = max_bytes
    declared = resp.content_length
    if limit is not None and declared is not None and declared > limit + 64 * 1024:  # room for the multipart framing
        raise _too_big(limit)
    content_type = resp.headers.get("Content-Type", "")
    if content_type.lower().startswith("multipart/"):
        reader = aiohttp.MultipartReader(resp.headers, resp.content)
        part = await reader.next()
        if part is None:
            raise DicomWebError("WADO-RS answer holds no instance", status=200, transient=False)
        if not isinstance(part, aiohttp.BodyPartReader):
            raise DicomWebError("WADO-RS answer holds a nested multipart", status=200, transient=False)
        body_part: aiohttp.BodyPartReader = part

        async def chunks() -> AsyncIterator[bytes]:
            while chunk := await body_part.read_chunk(CHUNK_SIZE):
                yield chunk
    elif content_type.lower().startswith("application/dicom"):
        async def chunks() -> AsyncIterator[bytes]:
            async for chunk in resp.content.iter_chunked(CHUNK_SIZE):
                yield chunk
    else:
        raise DicomWebError(f"WADO-RS answered {content_type or 'no Content-Type'}", status=200, transient=False)

    handle: BinaryIO = await asyncio.to_thread(open, tmp, "wb")
    written = 0
    prefix = b""
    try:
        async for chunk in chunks():
            if len(prefix) < 132:
                prefix += chunk[: 132 - len(prefix)]
            written += len(chunk)
            if limit is not None and written > limit:
                raise _too_big(limit)
            await asyncio.to_thread(handle.write, chunk)
        await asyncio.to_thread(_flush_and_sync, handle)
    finally:
        await asyncio.to_thread(handle.close)
    if prefix[128:132] != b"DICM":
        raise DicomWebError("WADO-RS answer is not a DICOM Part 10 file", status=200, transient=False)
    return written


def _too_big(limit: int) -> DicomWebError:
    return DicomWebError(
        f"WADO-RS answer over {limit // (1024 * 1024)} MB ([reports] max_report_mb): not kept", status=200, transient=False
    )


def _flush_and_sync(handle: BinaryIO) -> None:
    handle.flush()
    os.fsync(handle.fileno())
