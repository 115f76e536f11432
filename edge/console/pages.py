"""What the console's pages say and show, apart from their markup (``templates/``, autoescaped).

Made for technicians, not IT staff: big type and buttons, one clear word per state, the
reason in plain text beside anything stuck, and a stepper per visit that reads left to
right — images received, uploading, in the cloud, report ready, printed.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from edge.orders.today import UnmatchedStudy, VisitRow

STEPS: tuple[tuple[str, str], ...] = (
    ("received", "Images received"),
    ("uploading", "Uploading"),
    ("in_cloud", "In the cloud"),
    ("report_ready", "Report ready"),
    ("printed", "Printed"),
)
_STEP_INDEX = {name: i for i, (name, _) in enumerate(STEPS)}

MESSAGES = {
    "stat": "Marked STAT: its images go to the cloud first.",
    "sent": "Sending now.",
    "retried": "Queued again: the node will try to send it now.",
    "nothing_to_retry": "Nothing was stuck for that visit.",
    "reprint": "The patient may print once more at the kiosk (the slip is unlocked too).",
    "report_check": "Asking the cloud for the report now: the visit shows it as soon as it arrives.",
    "assigned": "The study now belongs to that visit.",
    "armed": "The ECG box is ready: its next recording belongs to that patient.",
    "user_added": "User added.",
    "unlocked": "Login delays ended: the user can try again from every PC now.",
    "logged_out": "You are logged out.",
}

# What ``?error=CODE`` shows. Only these fixed texts reach a page from the URL; an unknown
# code shows nothing, so a link cannot put words on the technician's screen.
ERRORS = {
    "no_visit": "That visit no longer exists.",
    "no_slip": "This visit has no kiosk slip.",
    "no_study": "That study is no longer on this node.",
    "no_order": "That order does not exist.",
    "choose_visit": "Choose the visit the images belong to.",
    "choose_ecg_patient": "Choose the patient for the next ECG.",
    "failed": "That could not be done. Reload the page and try again; the node's log has the reason.",
    "bad_user_name": "A user name is 1-32 lower-case letters, digits, '.', '_' or '-'.",
    "short_password": "The password must be at least 8 characters.",
    "bad_role": "The role must be technician or admin.",
    "user_exists": "A user with that name already exists.",
    "no_user": "There is no user with that name.",
    # A button's POST when its rule (edge.console.buttons) says it cannot act any more (the row changed meanwhile).
    "cannot_stat": "Mark STAT does nothing now: the visit's images are all in the cloud, or it is STAT already.",
    "cannot_send_now": "Send now does nothing now: nothing of that visit waits to be sent, or it is being sent.",
    "cannot_retry": "Nothing of that visit is stuck: there is nothing to retry.",
    "cannot_check_report": "Checking for the report works once all the visit's images are in the cloud "
                           "(and for the days the node watches for reports).",
    "cannot_reprint": "Allow reprint is for a report already printed at the kiosk: until then the patient "
                      "has every print left. A patient without the slip needs 'Reissue slip'.",
}


def message_text(code: str) -> str:
    """The fixed text for ``?msg=CODE``; "" for anything else."""
    return MESSAGES.get(code, "")


def error_text(code: str) -> str:
    """The fixed text for ``?error=CODE``; "" for anything else."""
    return ERRORS.get(code, "")

LANG_NAMES = {"en": "English", "zu": "isiZulu", "xh": "isiXhosa", "af": "Afrikaans", "st": "Sesotho"}
SEXES = (("F", "Female"), ("M", "Male"), ("O", "Other"))


class Step(NamedTuple):
    """One step of a visit's stepper: done, now or todo."""

    name: str
    label: str
    progress: str


def steps(row: VisitRow) -> list[Step]:
    """The stepper left to right; empty while the visit waits for its images."""
    if row.state == "waiting":
        return []
    current = _STEP_INDEX[row.state]
    shown = []
    for i, (name, label) in enumerate(STEPS):
        progress = "done" if i < current else "now" if i == current else "todo"
        if name == "uploading" and row.state == "uploading":
            label = upload_progress(row)
        shown.append(Step(name, label, progress))
    return shown


def upload_progress(row: VisitRow) -> str:
    """ "Uploading 3 of 5 images, 61 %": images in the cloud (or wholly sent), and the bytes that have left."""
    images = "image" if row.instances == 1 else "images"
    return f"Uploading {row.sent} of {row.instances} {images}, {row.percent} %"


class ClinicClock:
    """Times as the clinic reads them: in the node's time zone ([node] timezone), "2 Dec 2026 14:05".

    The store keeps naive UTC; every time a page shows goes through here.
    """

    def __init__(self, zone: ZoneInfo) -> None:
        self.zone = zone

    def local(self, at: dt.datetime | str) -> dt.datetime:
        moment = at if isinstance(at, dt.datetime) else dt.datetime.fromisoformat(str(at).removesuffix("Z"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.UTC)
        return moment.astimezone(self.zone)

    def when(self, at: dt.datetime | str) -> str:
        """Day, month, year and time: the Audit page, the registered page."""
        moment = self.local(at)
        return f"{moment.day} {moment:%b %Y %H:%M}"

    def stamp(self, at: dt.datetime | str) -> str:
        """As ``when`` with the seconds: the Audit page, where the order of events matters."""
        moment = self.local(at)
        return f"{moment.day} {moment:%b %Y %H:%M:%S}"

    def zone_name(self) -> str:
        """What the clinic calls its zone now ("SAST"), else the IANA name."""
        return dt.datetime.now(self.zone).tzname() or str(self.zone)

    def clock(self, at: dt.datetime | str) -> str:
        """The time of day, for today's rows."""
        return f"{self.local(at):%H:%M}"

    def day(self, at: dt.datetime | str) -> str:
        moment = self.local(at)
        return f"{moment.day} {moment:%b %Y}"

    def received_text(self, study: UnmatchedStudy) -> str:
        """When an unmatched study arrived."""
        moment = self.local(study.received_at)
        return f"{moment.day} {moment:%b %H:%M}"

    def template_globals(self) -> dict[str, Any]:
        return {"when": self.when, "local_clock": self.clock, "local_day": self.day,
                "received_text": self.received_text, "audit_stamp": self.stamp, "zone_name": self.zone_name}


class BoxView(NamedTuple):
    """What the ECG panel says of one box."""

    box_id: str
    status: str
    battery: str
    connected: bool
    lead_off: str
    armed: bool


def box_view(box: dict[str, Any]) -> BoxView:
    battery = f'{box["battery_pct"]}%' if box.get("battery_pct") is not None else "?"
    status = ("connected" if box["connected"] else "not connected") + (" · recording" if box.get("recording") else "")
    return BoxView(str(box["box_id"]), status, battery, bool(box["connected"]), ", ".join(box.get("lead_off") or []),
                   bool(box.get("armed")))


def user_state(user: dict[str, Any]) -> str:
    state = "disabled" if user["disabled"] else "active"
    if user["wrong_login_addresses"]:
        state += (f'; wrong passwords from {user["wrong_login_addresses"]} address(es) — each waits longer '
                  'after every wrong try (other PCs are not affected)')
    return state


AUDIT_ACTIONS = (  # what the technician reads under the Audit page's title, for the actions that are not plain words
    ("worklist", "a modality (its AE title under Who) read the day's worklist; the detail says how many patients "
                 "it was sent"),
    ("worklist_refused", "a worklist query was turned away, with why: a device that is not one of this clinic's "
                         "modalities gets no patients; repeats from the same device within a minute share one line "
                         "with their count"),
    ("reissue_slip", "a patient lost the slip: a new slip code and PIN for the same visit; the old slip stopped "
                     "working at that moment"),
)


def next_step(modality: str) -> str:
    """What the technician does after registering."""
    return ("Arm an ECG box for this patient on the Today page." if modality == "ECG"
            else "On the X-ray machine, open the worklist: the patient is there.")


TEMPLATE_GLOBALS: dict[str, Any] = {
    "steps": steps, "box_view": box_view, "user_state": user_state, "next_step": next_step,
    "LANG_NAMES": LANG_NAMES, "SEXES": SEXES, "AUDIT_ACTIONS": AUDIT_ACTIONS,
}
