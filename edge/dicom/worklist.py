"""The Modality Worklist the DR reads: today's orders, filtered the way the DR asks.

Only steps inside the window ``[dicom] worklist_days_back`` .. ``worklist_days_ahead``
around today are ever answered (default: today only), whatever range the DR asks for: a
worklist is the day's, not a search of every visit. An identifier that cannot be read as
a worklist query is refused (edge.dicom.identifier reads it strictly), never answered as
if it asked for nothing in particular.

Called from pynetdicom association threads. One short read (orders of the asked dates,
joined with their visits) runs before the first answer is sent, so no transaction stays
open while the DR reads the answers. Filters on modality, station AE title, patient and
accession follow DICOM matching (``*`` and ``?`` wildcards; empty matches all).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom.dsutils import encode

from edge.dicom.identifier import MalformedIdentifier
from edge.dicom.status import failure_status
from edge.orders.tables import Audit, Order, Visit, audit
from edge.store.db import write_transaction
from edge.store.models import utcnow
from edge.store.rows import rows_into

log = logging.getLogger(__name__)

STATUS_PENDING = 0xFF00
STATUS_BAD_IDENTIFIER = 0xA900
STATUS_UNABLE_TO_PROCESS = 0xC000

_DATE = re.compile(r"^\d{8}$")


class BadQuery(ValueError):
    """The query cannot be answered; ``status`` is the C-FIND failure to send."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class WorklistQuery:
    """What the DR asked for, already checked."""

    date_from: str  # YYYYMMDD, inclusive
    date_to: str
    modality: str = ""
    station_ae: str = ""
    patient_id: str = ""
    patient_name: str = ""
    accession_number: str = ""


def _text(ds: Dataset, keyword: str) -> str:
    element = ds.data_element(keyword) if keyword in ds else None
    if element is None or element.value is None:
        return ""
    if element.VM > 1:  # a multi-valued key ("A*\\B*"): pydicom's MultiValue is no list; ask the element
        raise BadQuery(STATUS_BAD_IDENTIFIER, f"{keyword} must have one value")
    text = str(element.value).strip()
    if "\ufffd" in text:  # pydicom put replacement characters for bytes the character set cannot decode
        raise BadQuery(STATUS_BAD_IDENTIFIER, f"{keyword} is not text in its character set")
    return text


def _check_date(value: str, keyword: str) -> str:
    if not _DATE.match(value):
        raise BadQuery(STATUS_BAD_IDENTIFIER, f"{keyword} is not a date (YYYYMMDD): {value[:20]!r}")
    try:
        dt.datetime.strptime(value, "%Y%m%d")
    except ValueError:
        raise BadQuery(STATUS_BAD_IDENTIFIER, f"{keyword} is not a real date: {value!r}") from None
    return value


def date_range(value: str, today: dt.date) -> tuple[str, str]:
    """A DA matching key (single date or range); empty means today: the worklist is the day's."""
    value = value.strip()
    name = "ScheduledProcedureStepStartDate"
    if not value:
        day = today.strftime("%Y%m%d")
        return day, day
    if "-" in value:
        first, _, last = value.partition("-")
        if not first and not last:
            raise BadQuery(STATUS_BAD_IDENTIFIER, f"{name}: a range needs at least one date")
        lo = _check_date(first, name) if first else "00000000"
        hi = _check_date(last, name) if last else "99991231"
        if lo > hi:
            raise BadQuery(STATUS_BAD_IDENTIFIER, f"{name}: the range ends before it starts")
        return lo, hi
    day = _check_date(value, name)
    return day, day


def window(today: dt.date, days_back: int = 0, days_ahead: int = 0) -> tuple[str, str]:
    """The dates the worklist may answer at all: today, widened by the configured days."""
    return ((today - dt.timedelta(days=days_back)).strftime("%Y%m%d"),
            (today + dt.timedelta(days=days_ahead)).strftime("%Y%m%d"))


def parse_query(identifier: Dataset, today: dt.date, days_back: int = 0, days_ahead: int = 0) -> WorklistQuery:
    """The DR's identifier as a query, its dates clamped to the window, or BadQuery naming the problem.

    A range reaching outside the window (``19000101-``) is cut to it; one wholly outside it
    matches nothing.
    """
    try:
        for _ in identifier.iterall():  # convert every element now: a broken value fails here, not half-way
            pass
        charsets = identifier.get("SpecificCharacterSet") or []
        for charset in [charsets] if isinstance(charsets, str) else charsets:
            if charset.strip() not in python_encoding:
                raise BadQuery(STATUS_BAD_IDENTIFIER, f"unknown SpecificCharacterSet {charset[:16]!r}")
        steps = identifier.get("ScheduledProcedureStepSequence")
        step = Dataset()
        if steps is not None:
            if not isinstance(steps, Sequence) and not isinstance(steps, list):
                raise BadQuery(STATUS_BAD_IDENTIFIER, "ScheduledProcedureStepSequence is not a sequence")
            if len(steps) > 1:
                raise BadQuery(STATUS_BAD_IDENTIFIER, "ScheduledProcedureStepSequence has more than one item")
            if len(steps) == 1:
                step = steps[0]
        lo, hi = date_range(_text(step, "ScheduledProcedureStepStartDate"), today)
        first, last = window(today, days_back, days_ahead)
        lo, hi = max(lo, first), min(hi, last)
        return WorklistQuery(
            date_from=lo, date_to=hi,
            modality=_text(step, "Modality"),
            station_ae=_text(step, "ScheduledStationAETitle"),
            patient_id=_text(identifier, "PatientID"),
            patient_name=_text(identifier, "PatientName"),
            accession_number=_text(identifier, "AccessionNumber"),
        )
    except BadQuery:
        raise
    except Exception as exc:  # a value pydicom cannot convert: the identifier is broken
        raise BadQuery(STATUS_UNABLE_TO_PROCESS, f"cannot read the query: {type(exc).__name__}") from None


def _wildcard(key: str, value: str) -> bool:
    """``*`` any run, ``?`` any one character, the rest literal: two pointers, no regex, no recursion.

    On a mismatch after a ``*`` only that last star is widened by one character; every
    earlier star stays put, because the text between two stars matched at its leftmost place
    is never worse placed further right. So the work is at most len(key) * len(value) steps,
    whatever the key: ``*?*?*?*?*?*?*?*Q`` against a long name is microseconds, where the
    regex it replaces backtracked for seconds and held the GIL (C-ECHO and console stalled).
    """
    k = v = 0
    star = -1  # index in key of the last '*' seen
    resume = 0  # where in value that star's run currently ends
    while v < len(value):
        if k < len(key) and key[k] == "*":
            star, resume = k, v
            k += 1
        elif k < len(key) and (key[k] == "?" or key[k] == value[v]):
            k += 1
            v += 1
        elif star >= 0:
            resume += 1
            k, v = star + 1, resume
        else:
            return False
    while k < len(key) and key[k] == "*":
        k += 1
    return k == len(key)


def matches(key: str, value: str, fold: bool = False) -> bool:
    """DICOM single-value / wildcard matching; an empty key or ``*`` matches anything; ``fold``: any case."""
    if not key or key == "*":
        return True
    if fold:
        key, value = key.lower(), value.lower()
    if "*" not in key and "?" not in key:
        return key == value
    return _wildcard(key, value)


@dataclass(frozen=True)
class WorklistItem:
    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    accession_number: str
    study_instance_uid: str
    exam: str
    modality: str
    station_ae: str
    date: str
    time: str
    state: str
    stat: bool


def scheduled_items(query: WorklistQuery) -> list[WorklistItem]:
    """The orders on the worklist for the query: one indexed read, then filters in memory."""
    orders = (
        Order.select(
            Visit.patient_name, Visit.patient_id, Visit.birth_date, Visit.sex, Order.accession_number,
            Order.study_instance_uid, Order.exam, Order.modality, Order.station_ae, Order.scheduled_date,
            Order.scheduled_time, Order.state, Order.stat,
        )
        .join(Visit)
        .where(Order.scheduled_date.between(query.date_from, query.date_to), Order.state != "cancelled")
        .order_by(Order.scheduled_date, Order.scheduled_time, Order.id)
    )
    items = rows_into(orders, WorklistItem)
    return [
        i for i in items
        if matches(query.modality, i.modality)
        and matches(query.station_ae, i.station_ae)
        and matches(query.patient_id, i.patient_id)
        and matches(query.patient_name, i.patient_name, fold=True)
        and matches(query.accession_number, i.accession_number)
    ]


def item_dataset(item: WorklistItem) -> Dataset:
    """The attributes a DR needs to take the image and put our identifiers in it."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = item.patient_name
    ds.PatientID = item.patient_id
    ds.PatientBirthDate = item.birth_date
    ds.PatientSex = item.sex
    ds.AccessionNumber = item.accession_number
    ds.ReferringPhysicianName = ""
    ds.StudyInstanceUID = item.study_instance_uid
    ds.RequestedProcedureDescription = item.exam[:64]
    ds.RequestedProcedureID = item.accession_number
    ds.RequestedProcedurePriority = "STAT" if item.stat else "ROUTINE"
    step = Dataset()
    step.Modality = item.modality
    step.ScheduledStationAETitle = item.station_ae
    step.ScheduledProcedureStepStartDate = item.date
    step.ScheduledProcedureStepStartTime = item.time
    step.ScheduledProcedureStepDescription = item.exam[:64]
    step.ScheduledProcedureStepID = item.accession_number
    step.ScheduledPerformingPhysicianName = ""
    step.ScheduledProcedureStepStatus = "STARTED" if item.state == "started" else "SCHEDULED"
    ds.ScheduledProcedureStepSequence = Sequence([step])
    return ds


@lru_cache(maxsize=4096)
def _encoded(item: WorklistItem, implicit_vr: bool, deflated: bool = False) -> bytes:
    """An item's answer encoded once: a busy DR asks for the same 500 items every few minutes."""
    return bytes(encode(item_dataset(item), implicit_vr and not deflated, True, deflated) or b"")


class EncodedAnswer(Dataset):
    """A worklist answer already encoded in the association's transfer syntax.

    pynetdicom encodes every C-FIND identifier it sends; ``edge.dicom.find_responses`` teaches
    its encoder to hand these bytes over as they are (a busy DR asks for 500 items).
    """

    def __init__(self, encoded: bytes) -> None:
        super().__init__()
        self.__dict__["encoded"] = encoded


def cached_dataset(item: WorklistItem, implicit_vr: bool = True, deflated: bool = False) -> Dataset:
    """The item's answer, encoded once per item and transfer syntax."""
    return EncodedAnswer(_encoded(item, implicit_vr, deflated))


def failure(status: int, reason: str) -> Dataset:
    """The C-FIND failure status; the reason made one LO value (edge.dicom.status)."""
    return failure_status(status, reason)


def answer(read_identifier: Callable[[], Dataset], today: dt.date | None = None,
           cancelled: Callable[[], bool] = lambda: False,
           implicit_vr: bool = True, days_back: int = 0,
           days_ahead: int = 0, deflated: bool = False) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """C-FIND responses for pynetdicom: pending matches, or one failure for a bad query.

    ``implicit_vr`` / ``deflated``: the association's transfer syntax, so cached answers are already in it.
    ``days_back`` / ``days_ahead``: the window around today that may be answered at all.
    """
    try:
        query = parse_query(read_identifier(), today or dt.date.today(), days_back, days_ahead)
    except MalformedIdentifier as exc:  # not a dataset at all: never "a query for nothing in particular"
        yield failure(STATUS_BAD_IDENTIFIER, f"malformed identifier: {exc}"), None
        return
    except BadQuery as exc:
        yield failure(exc.status, exc.reason), None
        return
    except Exception as exc:  # the identifier did not even decode
        yield failure(STATUS_UNABLE_TO_PROCESS, f"cannot decode the query: {type(exc).__name__}"), None
        return
    for item in scheduled_items(query):
        if cancelled():
            yield 0xFE00, None
            return
        yield STATUS_PENDING, cached_dataset(item, implicit_vr, deflated)


REFUSALS_WINDOW_S = 60.0  # at most one refused-query row per (calling AE, address) in this long
REFUSALS_FLUSH_S = 5.0  # a repeat's count reaches its row within this long, in one UPDATE for all of them
REFUSALS_AE_PER_ADDRESS = 4  # more AE titles than this from one address in a window share one row
SEVERAL_AE_TITLES = "(several AE titles)"


@dataclass
class _Run:
    """Refused queries from one (calling AE, address) within one window, and what its row says so far."""

    row_id: int
    started: float  # monotonic
    first_at: dt.datetime
    last_at: dt.datetime
    outcome: str
    count: int = 1
    written: int = 1
    flush_pending: bool = False


class RefusedQueries:
    """Coalesces refused worklist queries: one audit row per (calling AE, address) per window, with a count.

    A stranger looping refused C-FINDs wrote one row and one fsync per query: the console's
    audit page (newest 300) filled with them in seconds and every write queued beside the DR's
    C-STOREs for the store's one writer. Now the first refusal of a window writes its row at
    once; repeats are counted in memory and written to that row in one UPDATE at most every
    ``flush_s`` (a timer, so the count is right even when the stranger stops). The next
    window opens a new row. Thread-safe: association threads and the flush timers share one
    lock, held across the short write so a row's count only ever grows. In-process state: a
    node stopped mid-window loses at most ``flush_s`` of repeats from the count, never a row.
    """

    def __init__(self, window_s: float = REFUSALS_WINDOW_S, flush_s: float = REFUSALS_FLUSH_S,
                 ae_per_address: int = REFUSALS_AE_PER_ADDRESS,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], dt.datetime] = utcnow,
                 timer: Callable[[float, Callable[[], None]], Any] | None = None) -> None:
        self.window_s, self.flush_s, self.ae_per_address = window_s, flush_s, ae_per_address
        self._clock, self._wall = clock, wall
        self._timer = timer or _daemon_timer
        self._lock = threading.Lock()
        self._runs: dict[tuple[str, str], _Run] = {}

    def record(self, calling_ae: str, address: str, outcome: str) -> None:
        """Count one refused query; writes a new row only when this key has none open."""
        with self._lock:
            now = self._clock()
            self._forget_closed(now)
            key = self._key(calling_ae, address, now)
            run = self._runs.get(key)
            if run is not None and now - run.started < self.window_s:
                run.count, run.last_at, run.outcome = run.count + 1, self._wall(), outcome
                if not run.flush_pending:
                    run.flush_pending = True
                    self._timer(self.flush_s, lambda: self._flush(key, run))
                return
            if run is not None:
                self._write(run)  # the old window's last repeats, before its successor's row
            at = self._wall()
            with write_transaction():
                row = audit(key[0], "worklist_refused", detail=outcome, client=address)
            self._runs[key] = _Run(int(row.id), now, at, at, outcome)

    def _key(self, calling_ae: str, address: str, now: float) -> tuple[str, str]:
        """(AE, address), or (several, address) once one address has used up its AE titles: rotating titles is no way round."""
        key = (calling_ae or "?", address)
        if key in self._runs:
            return key
        open_here = sum(1 for (ae, addr), r in self._runs.items()
                        if addr == address and ae != SEVERAL_AE_TITLES and now - r.started < self.window_s)
        return (SEVERAL_AE_TITLES, address) if open_here >= self.ae_per_address else key

    def _forget_closed(self, now: float) -> None:
        """Drop runs whose window is over and whose count is written: memory stays bounded by the live keys."""
        if len(self._runs) < 64:
            return
        for key in [k for k, r in self._runs.items() if now - r.started >= self.window_s and r.written == r.count]:
            del self._runs[key]

    def _flush(self, key: tuple[str, str], run: _Run) -> None:
        try:
            with self._lock:
                run.flush_pending = False
                self._write(run)
        except Exception as exc:  # a full disk: the row keeps its last count, the DR's queries are unaffected
            log.error("could not update the refused-query count of %s (%s): %s", key[0], key[1], exc)

    def _write(self, run: _Run) -> None:
        """The run's row, brought up to its count (caller holds the lock)."""
        if run.written == run.count:
            return
        detail = (f"{run.outcome} — {run.count} times, {run.first_at:%H:%M:%S} to {run.last_at:%H:%M:%S}")[:500]
        with write_transaction():
            Audit.update(detail=detail).where(Audit.id == run.row_id).execute()
        run.written = run.count


def _daemon_timer(delay: float, call: Callable[[], None]) -> threading.Timer:
    timer = threading.Timer(delay, call)
    timer.daemon = True
    timer.start()
    return timer


_refused = RefusedQueries()


def audit_query(calling_ae: str, address: str, outcome: str, refused: bool = False) -> None:
    """A row in the console's audit for a worklist query: who asked, from where, what they got.

    Runs on the association thread, through the store's one writer. ``outcome`` never holds
    the query's keys (they can be a patient's name). Every answered query is its own row: an
    answer handed patient data to a modality, and each hand-over is worth its line. Refused
    ones are coalesced per (calling AE, address) and minute (:class:`RefusedQueries`): a
    stranger's loop is one row with a count, not the page.
    """
    if refused:
        _refused.record(calling_ae, address, outcome)
        return
    with write_transaction():
        audit(calling_ae or "?", "worklist", detail=outcome, client=address)
