"""What a visit row says about its report beyond the stepper: a preliminary report, an amendment
after printing, and whether "Check for the report now" can do anything.

The report puller (``sync.reports``) decides which report is current; this only reads it.
A refresh of the Today page (500 visits a day in the benchmark) costs a fixed two grouped
queries, plus one look-up per study that actually has a preliminary report.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from peewee import fn

from edge.orders.today import VisitRow
from edge.store.models import Study, utcnow
from edge.store.rows import rows
from sync.reports import is_final, preliminary_report
from sync.tables import Report

# The stepper's states once every image is in the cloud: only then does the puller watch the study.
IN_CLOUD = ("in_cloud", "report_ready", "printed")


@dataclass(frozen=True)
class ReportNote:
    """The report lines of one visit row."""

    preliminary_text: str = ""  # the reader's draft, shown to staff only, clearly not final
    preliminary_doctor: str = ""
    amended_after_printing: bool = False
    can_check: bool = False  # "Check for the report now" is offered

    @property
    def signature(self) -> str:
        """Changes when the row's report lines change (the Today page refetches the row)."""
        return f"{len(self.preliminary_text)}:{self.preliminary_text[:16]}:{int(self.amended_after_printing)}:" \
               f"{int(self.can_check)}"


def report_notes(visits: list[VisitRow], data_dir: Path, lookback_days: int,
                 now: dt.datetime | None = None) -> dict[int, ReportNote]:
    """One note per visit whose images are all in the cloud (others have nothing to say yet).

    Check-now is offered for every such visit received within ``lookback_days``, with or
    without a current report: the puller watches exactly those studies, and a reader who
    phones to say "I have corrected it" is the case staff most need it for. Older studies
    are no longer watched, so the button would do nothing there and is not shown.
    """
    now = now or utcnow()
    wanted = {uid: v.order_id for v in visits if v.state in IN_CLOUD and not v.problem for uid in v.study_uids}
    if not wanted:
        return {}
    since = now - dt.timedelta(days=lookback_days)
    watched: set[str] = set()
    query = Study.select(Study.study_instance_uid, Study.received_at).where(Study.study_instance_uid.in_(list(wanted)))
    for uid, received in rows(query, tuple[str, dt.datetime | str]):
        received_at = received if isinstance(received, dt.datetime) else dt.datetime.fromisoformat(str(received))
        if received_at >= since:
            watched.add(uid)
    drafts: set[str] = set()
    amended: set[str] = set()
    kinds = (
        Report.select(Study.study_instance_uid, Report.kind, Report.verification_flag, Report.completion_flag,
                      fn.MAX(Report.amended_after_printing))
        .join(Study).where(Study.study_instance_uid.in_(list(wanted)))
        .group_by(Study.study_instance_uid, Report.kind, Report.verification_flag, Report.completion_flag)
    )
    for uid, kind, verification, completion, flagged in rows(kinds, tuple[str, str, str, str, bool | int]):
        if not is_final(kind, verification, completion):
            drafts.add(uid)
        if flagged:
            amended.add(uid)
    notes: dict[int, ReportNote] = {}
    for visit in visits:
        uids = [uid for uid in visit.study_uids if uid in wanted]
        if not uids:
            continue
        draft = next((p for uid in uids if uid in drafts and (p := preliminary_report(uid, data_dir))), None)
        notes[visit.order_id] = ReportNote(
            preliminary_text=draft.text if draft is not None else "",  # a PDF is always final: a draft is an SR
            preliminary_doctor=draft.reading_doctor if draft is not None else "",
            amended_after_printing=any(uid in amended for uid in uids),
            can_check=any(uid in watched for uid in uids),
        )
    return notes
