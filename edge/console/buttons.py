"""When each of a visit row's buttons can do something: one rule per button, read by the row's
template (the button is shown) and by its POST (refused with a notice otherwise).

Each rule follows what the action does (``edge.console.actions``):

- Mark STAT moves the visit's waiting images to the front and raises those still to come:
  nothing to move once every image is in the cloud (or the visit is STAT already).
- Send now makes waiting or failed images due at once: nothing to do while none waits,
  and nothing to gain while a request of the visit is under way (the slot is on it).
- Retry queues quarantined images again: only when one is stuck.
- Check for the report now asks the cloud for the visit's report: only once every image
  is there, within the days the report puller watches (``report_notes``).
- Allow reprint gives the slip one print beyond its limit: until a report was printed the
  patient has every print left, so it does nothing.
- Reissue slip makes a new code + PIN and revokes the old: always possible (a visit whose
  slip failed at registration gets its first one).
"""

from __future__ import annotations

from edge.console.report_notes import ReportNote
from edge.orders.today import VisitRow

UPLOAD_NOT_DONE = ("waiting", "received", "uploading")


def can_mark_stat(row: VisitRow) -> bool:
    return not row.stat and row.state in UPLOAD_NOT_DONE


def can_send_now(row: VisitRow) -> bool:
    return row.queued > 0 and row.sending == 0


def can_retry(row: VisitRow) -> bool:
    return row.problem == "quarantined"


def can_check_report(note: ReportNote | None) -> bool:
    return note is not None and note.can_check


def can_allow_reprint(row: VisitRow) -> bool:
    return bool(row.ticket_code) and row.state == "printed"


def can_reissue_slip(row: VisitRow) -> bool:
    return True


def can_act(action: str, row: VisitRow, note: ReportNote | None) -> bool:
    """The rule for a POST ``/visits/{id}/{action}``."""
    rules = {
        "stat": lambda: can_mark_stat(row),
        "send-now": lambda: can_send_now(row),
        "retry": lambda: can_retry(row),
        "check-report": lambda: can_check_report(note),
        "reprint": lambda: can_allow_reprint(row),
        "reissue": lambda: can_reissue_slip(row),
    }
    return rules[action]()


TEMPLATE_GLOBALS = {
    "can_mark_stat": can_mark_stat, "can_send_now": can_send_now, "can_retry": can_retry,
    "can_check_report": can_check_report, "can_allow_reprint": can_allow_reprint, "can_reissue_slip": can_reissue_slip,
}
