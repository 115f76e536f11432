"""The console's server-rendered pages: plain HTML, every value escaped, no script inline.

Made for technicians, not IT staff: big type and buttons, one clear word per state, the
reason in plain text beside anything stuck, and a stepper per visit that reads left to
right — images received, uploading, in the cloud, report ready, printed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from html import escape
from typing import Any

from edge.orders.register import ExamChoice
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
}


def message_text(code: str) -> str:
    """The fixed text for ``?msg=CODE``; "" for anything else."""
    return MESSAGES.get(code, "")


def error_text(code: str) -> str:
    """The fixed text for ``?error=CODE``; "" for anything else."""
    return ERRORS.get(code, "")

LANG_NAMES = {"en": "English", "zu": "isiZulu", "xh": "isiXhosa", "af": "Afrikaans", "st": "Sesotho"}


def e(value: object) -> str:
    return escape(str(value), quote=True)


def csrf_field(token: str) -> str:
    return f'<input type="hidden" name="csrf" value="{e(token)}">'


def layout(title: str, body: str, clinic: str, user: str = "", role: str = "", csrf: str = "",
           refresh_s: float | None = None, page: str = "") -> str:
    nav = ""
    if user:
        admin = '<a href="/users">Users</a><a href="/audit">Audit</a>' if role == "admin" else '<a href="/audit">Audit</a>'
        nav = (
            f'<nav><a href="/">Today</a><a class="primary" href="/register">+ Register patient</a>{admin}'
            f'<form method="post" action="/logout" class="inline">{csrf_field(csrf)}'
            f'<button type="submit" class="link" id="logout">Log out {e(user)}</button></form></nav>'
        )
    refresh = f' data-refresh="{refresh_s:g}"' if refresh_s else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)} · {e(clinic)}</title>"
        '<link rel="stylesheet" href="/static/console.css">'
        '<script src="/static/console.js" defer></script></head>'
        f'<body data-page="{e(page)}"{refresh}><header><span class="clinic">{e(clinic)}</span>{nav}</header>'
        f"<main>{body}</main></body></html>"
    )


def notice(text: str, kind: str = "ok") -> str:
    return f'<p class="notice {kind}" role="status">{e(text)}</p>' if text else ""


def login_page(clinic: str, csrf: str, message: str = "", user: str = "") -> str:
    body = (
        '<section class="card narrow"><h1>Log in</h1>'
        f'{notice(message, "error") if message else ""}'
        f'<form method="post" action="/login" id="login-form">{csrf_field(csrf)}'
        f'<label>User name<input name="user" id="user" autocomplete="username" required value="{e(user)}"></label>'
        '<label>Password<input name="password" id="password" type="password" autocomplete="current-password" required></label>'
        '<button type="submit" class="big" id="login">Log in</button></form></section>'
    )
    return layout("Log in", body, clinic, page="login")


def _stepper(row: VisitRow) -> str:
    if row.state == "waiting":
        return '<span class="waiting">Waiting for images</span>'
    current = _STEP_INDEX[row.state]
    parts = []
    for i, (name, label) in enumerate(STEPS):
        cls = "done" if i < current else "now" if i == current else "todo"
        if name == "uploading" and row.state == "uploading":
            label = f"Uploading {row.percent}%"
        parts.append(f'<li class="{cls}" data-step="{name}">{e(label)}</li>')
    return f'<ol class="steps">{"".join(parts)}</ol>'


def _problem(row: VisitRow) -> str:
    if not row.problem:
        return ""
    if row.problem == "quarantined":
        return f'<p class="problem stuck">Stuck — the cloud refused it: {e(row.reason or "no reason given")}</p>'
    return f'<p class="problem retrying">Could not send yet, trying again: {e(row.reason)}</p>'


def visit_row(row: VisitRow, csrf: str) -> str:
    buttons = []
    if not row.stat:
        buttons.append(f'<button formaction="/visits/{row.order_id}/stat" class="stat">Mark STAT</button>')
    if row.state in ("received", "uploading") or row.problem == "failed":
        buttons.append(f'<button formaction="/visits/{row.order_id}/send-now">Send now</button>')
    if row.problem == "quarantined":
        buttons.append(f'<button formaction="/visits/{row.order_id}/retry" class="warn">Retry</button>')
    if row.ticket_code:
        buttons.append(f'<button formaction="/visits/{row.order_id}/reprint">Allow reprint</button>')
    stat = '<span class="badge stat">STAT</span>' if row.stat else ""
    return (
        f'<tr data-order="{row.order_id}" data-state="{e(row.state)}" data-problem="{e(row.problem)}" data-sig="{e(row.signature)}">'
        f'<td class="time">{e(row.registered)}</td>'
        f'<td><strong>{e(row.patient_name)}</strong>{stat}<br><small>{e(row.patient_id)}</small></td>'
        f'<td>{e(row.exam)}<br><small class="acc">{e(row.accession_number)}</small></td>'
        f'<td class="state">{_stepper(row)}{_problem(row)}</td>'
        f'<td><form method="post" class="actions">{csrf_field(csrf)}{"".join(buttons)}</form></td></tr>'
    )


def _unmatched(studies: Sequence[UnmatchedStudy], orders: Sequence[VisitRow], csrf: str) -> str:
    if not studies:
        return ""
    options = "".join(
        f'<option value="{r.order_id}">{e(r.registered)} {e(r.patient_name)} — {e(r.exam)} ({e(r.accession_number)})</option>'
        for r in orders
    )
    items = []
    for s in studies:
        received = s.received_at.replace(tzinfo=dt.UTC).astimezone().strftime("%d %b %H:%M")
        items.append(
            f'<li data-study="{e(s.study_instance_uid)}"><span><strong>{e(s.modalities)}</strong>, {s.instances} image(s), '
            f'received {e(received)}; patient id {e(s.patient_id or "none")}, accession {e(s.accession_number or "none")}</span>'
            f'<form method="post" action="/assign">{csrf_field(csrf)}'
            f'<input type="hidden" name="study" value="{e(s.study_instance_uid)}">'
            f'<select name="order" required><option value="">Choose the visit…</option>{options}</select>'
            '<button type="submit">Assign</button></form></li>'
        )
    return (
        '<section class="card alert" id="unmatched"><h2>Images without a visit</h2>'
        '<p>These arrived without a matching registration. Choose whose they are.</p>'
        f'<ul class="unmatched">{"".join(items)}</ul></section>'
    )


def _ecg_panel(boxes: Sequence[dict[str, Any]], orders: Sequence[VisitRow], csrf: str) -> str:
    if not boxes:
        return ('<section class="card" id="ecg"><h2>ECG boxes</h2>'
                '<p class="muted">No ECG box connected.</p></section>')
    ecg_orders = [r for r in orders if r.modality == "ECG"]
    options = "".join(
        f'<option value="{r.order_id}">{e(r.registered)} {e(r.patient_name)} ({e(r.accession_number)})</option>'
        for r in ecg_orders
    )
    items = []
    for box in boxes:
        battery = f'{box["battery_pct"]}%' if box.get("battery_pct") is not None else "?"
        leads = ", ".join(box.get("lead_off") or [])
        status = ("connected" if box["connected"] else "not connected") + (" · recording" if box.get("recording") else "")
        if not box["connected"]:
            lead_text = '<span class="muted">electrodes unknown</span>'  # a box that is away says nothing
        elif leads:
            lead_text = f'<span class="problem">Electrode off: {e(leads)}</span>'
        else:
            lead_text = '<span class="ok">Electrodes on</span>'
        form = (
            f'<form method="post" action="/ecg/arm">{csrf_field(csrf)}<input type="hidden" name="box" value="{e(box["box_id"])}">'
            f'<select name="order" required><option value="">Patient for the next ECG…</option>{options}</select>'
            '<button type="submit">Arm box</button></form>'
        ) if ecg_orders else '<small class="muted">Register an ECG visit to arm this box.</small>'
        items.append(
            f'<li data-box="{e(box["box_id"])}"><strong>{e(box["box_id"])}</strong> {e(status)} · battery {e(battery)} · '
            f'{lead_text}{" · <em>armed</em>" if box.get("armed") else ""}{form}</li>'
        )
    return f'<section class="card" id="ecg"><h2>ECG boxes</h2><ul class="boxes">{"".join(items)}</ul></section>'


def today_page(clinic: str, user: str, role: str, csrf: str, rows: Sequence[VisitRow],
               unmatched: Sequence[UnmatchedStudy], boxes: Sequence[dict[str, Any]], refresh_s: float,
               message: str = "", error: str = "", box_signature: str = "") -> str:
    table = "".join(visit_row(r, csrf) for r in rows) or (
        '<tr><td colspan="5" class="muted">No visits yet today. Press “Register patient”.</td></tr>')
    body = (
        f'{notice(message)}{notice(error, "error")}'
        f'{_unmatched(unmatched, rows, csrf)}'
        # What this page shows of the unmatched list and the boxes: the script reloads when they change.
        f'<section class="card" id="visits" data-unmatched="{e(",".join(u.study_instance_uid for u in unmatched))}"'
        f' data-boxes="{e(box_signature)}"><h1>Today’s visits <small id="count">{len(rows)}</small></h1>'
        '<table class="visits"><thead><tr><th>Time</th><th>Patient</th><th>Exam</th><th>Where it is</th><th></th></tr></thead>'
        f'<tbody>{table}</tbody></table></section>'
        f'{_ecg_panel(boxes, rows, csrf)}'
    )
    return layout("Today", body, clinic, user, role, csrf, refresh_s=refresh_s, page="today")


def _field(name: str, label: str, control: str, errors: dict[str, str], hint: str = "") -> str:
    err = f'<span class="field-error" id="{name}-error">{e(errors[name])}</span>' if name in errors else ""
    hint_html = f"<small>{e(hint)}</small>" if hint else ""
    return f'<div class="field{" has-error" if err else ""}"><label for="{name}">{e(label)}</label>{control}{hint_html}{err}</div>'


def register_page(clinic: str, user: str, role: str, csrf: str, choices: Sequence[ExamChoice],
                  languages: Sequence[str], form: dict[str, str] | None = None,
                  errors: dict[str, str] | None = None) -> str:
    form = form or {}
    errors = errors or {}

    def val(name: str) -> str:
        return e(form.get(name, ""))

    sexes = "".join(
        f'<label class="choice"><input type="radio" name="sex" value="{v}"{" checked" if form.get("sex") == v else ""}> {t}</label>'
        for v, t in (("F", "Female"), ("M", "Male"), ("O", "Other"))
    )
    exams = "".join(
        f'<label class="choice"><input type="radio" name="exam" value="{e(c.exam)}"'
        f'{" checked" if form.get("exam", choices[0].exam) == c.exam else ""}> {e(c.exam)}</label>'
        for c in choices
    )
    langs = "".join(
        f'<option value="{e(lang)}"{" selected" if form.get("language") == lang else ""}>{e(LANG_NAMES.get(lang, lang))}</option>'
        for lang in languages
    )
    summary = notice("Please correct the fields marked in red.", "error") if errors else ""
    body = (
        f'<section class="card"><h1>Register a patient</h1>{summary}'
        f'<form method="post" action="/register" id="register-form" novalidate>{csrf_field(csrf)}'
        + _field("surname", "Surname", f'<input id="surname" name="surname" value="{val("surname")}" autocomplete="off">', errors)
        + _field("given_names", "First names", f'<input id="given_names" name="given_names" value="{val("given_names")}" autocomplete="off">', errors)
        + _field("sex", "Sex", f'<div class="choices">{sexes}</div>', errors)
        + _field("birth_date", "Date of birth", f'<input id="birth_date" name="birth_date" type="date" value="{val("birth_date")}">',
                 errors, "Filled in from the SA ID number when left empty.")
        + _field("id_number", "SA ID number", f'<input id="id_number" name="id_number" inputmode="numeric" maxlength="16" value="{val("id_number")}" autocomplete="off">',
                 errors, "13 digits. No ID document? Leave empty and give the clinic folder number.")
        + _field("folder_number", "Clinic folder number", f'<input id="folder_number" name="folder_number" value="{val("folder_number")}" autocomplete="off">', errors)
        + _field("exam", "Exam", f'<div class="choices">{exams}</div>', errors)
        + _field("language", "Slip language", f'<select id="language" name="language">{langs}</select>', errors)
        + '<button type="submit" class="big primary" id="register">Register and make the slip</button></form></section>'
    )
    return layout("Register", body, clinic, user, role, csrf, page="register")


def registered_page(clinic: str, user: str, role: str, csrf: str, row: VisitRow, code: str, pin: str,
                    modality: str) -> str:
    slip = (
        f'<p class="slip"><span>Slip code <strong id="slip-code">{e(code[:3])} {e(code[3:6])} {e(code[6:])}</strong></span>'
        f'<span>PIN <strong id="slip-pin">{e(" ".join(pin))}</strong></span></p>'
        f'<p><a class="btn big primary" id="slip" href="/visits/{row.order_id}/slip.pdf" target="_blank">Open the slip to print</a></p>'
        '<p class="muted">The PIN is shown only now and on the slip. Give the slip to the patient.</p>'
    ) if code else '<p class="notice error">No kiosk slip could be made; the visit is registered.</p>'
    next_step = ("Arm an ECG box for this patient on the Today page." if modality == "ECG"
                 else "On the X-ray machine, open the worklist: the patient is there.")
    body = (
        f'<section class="card"><h1>Registered</h1><p class="big-text"><strong id="reg-name">{e(row.patient_name)}</strong>'
        f' — {e(row.exam)}</p><p>Accession number <strong id="accession">{e(row.accession_number)}</strong></p>'
        f"{slip}<p>{e(next_step)}</p>"
        '<p><a class="btn" href="/">Back to today</a> <a class="btn" href="/register">Register the next patient</a></p></section>'
    )
    return layout("Registered", body, clinic, user, role, csrf, page="registered")


def _user_state(u: dict[str, Any]) -> str:
    state = "disabled" if u["disabled"] else "active"
    if u["wrong_login_addresses"]:
        state += (f'; wrong passwords from {u["wrong_login_addresses"]} address(es) — each waits longer '
                  'after every wrong try (other PCs are not affected)')
    return e(state)


def users_page(clinic: str, user: str, role: str, csrf: str, users: Sequence[dict[str, Any]],
               message: str = "", error: str = "") -> str:
    rows = "".join(
        f'<tr><td>{e(u["name"])}</td><td>{e(u["role"])}</td><td>{_user_state(u)}</td>'
        f'<td>{e(u["last_login"] or "never")}</td><td>'
        + (f'<form method="post" action="/users/unlock">{csrf_field(csrf)}<input type="hidden" name="name" value="{e(u["name"])}">'
           '<button type="submit">End login delays</button></form>' if u["wrong_login_addresses"] else "")
        + "</td></tr>"
        for u in users
    )
    body = (
        f'{notice(message)}{notice(error, "error")}'
        f'<section class="card"><h1>Users</h1><table><thead><tr><th>Name</th><th>Role</th><th>State</th><th>Last login</th><th></th></tr></thead>'
        f"<tbody>{rows}</tbody></table></section>"
        f'<section class="card narrow"><h2>Add a user</h2><form method="post" action="/users/add">{csrf_field(csrf)}'
        '<label>User name<input name="name" required></label>'
        '<label>Role<select name="role"><option value="technician">technician</option><option value="admin">admin</option></select></label>'
        '<label>Password (8 characters or more)<input name="password" type="password" required autocomplete="new-password"></label>'
        '<button type="submit" class="big">Add user</button></form></section>'
    )
    return layout("Users", body, clinic, user, role, csrf, page="users")


AUDIT_ACTIONS = (  # what the technician reads under the Audit page's title, for the actions that are not plain words
    ("worklist", "a modality (its AE title under Who) read the day's worklist; the detail says how many patients "
                 "it was sent"),
    ("worklist_refused", "a worklist query was turned away, with why: a device that is not one of this clinic's "
                         "modalities gets no patients; repeats from the same device within a minute share one line "
                         "with their count"),
)


def _when(at: str) -> str:
    """``2026-12-01T22:32:09Z`` as ``2026-12-01 22:32:09``: the column already says UTC."""
    return at.replace("T", " ").removesuffix("Z")


def audit_page(clinic: str, user: str, role: str, csrf: str, rows: Sequence[dict[str, Any]]) -> str:
    body_rows = "".join(
        f'<tr><td><time datetime="{e(r["at"])}">{e(_when(r["at"]))}</time></td><td>{e(r["user"])}</td>'
        f'<td>{e(r["action"])}</td><td>{e(r["accession_number"])}</td>'
        f'<td>{e(r["detail"])}</td><td>{e(r["client"])}</td></tr>'
        for r in rows
    )
    legend = "".join(f"<li><b>{e(action)}</b>: {e(text)}</li>" for action, text in AUDIT_ACTIONS)
    body = (
        '<section class="card"><h1>Audit log</h1><p class="muted">Who registered, changed or reprinted what, who '
        "signed in, and every worklist query: which modality read the day's list, or which device was refused it "
        "and why (newest first).</p>"
        f'<ul class="muted legend">{legend}</ul>'
        '<table><thead><tr><th>When (UTC)</th><th>Who</th><th>Action</th><th>Accession</th><th>Detail</th><th>From</th></tr></thead>'
        f"<tbody>{body_rows}</tbody></table></section>"
    )
    return layout("Audit", body, clinic, user, role, csrf, page="audit")
