"""The console's routes: login, today's visits (live), registration and the technician's actions.

Every page but ``/healthz``, ``/metrics``, ``/login`` and ``/static`` needs a session.
Every POST carries the session's CSRF token (login: a double-submit cookie), else 403.
Database work runs in worker threads (``asyncio.to_thread``) so the loop never waits on
SQLite or scrypt.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web

from edge.node.config import EdgeConfig
from edge import web as shared
from edge.console import accounts, actions, buttons, pages
from edge.console.accounts import SessionInfo
from edge.console.report_notes import ReportNote, report_notes
from edge.orders.matching import AssignError, assign_study
from edge.orders.register import (
    ExamChoice,
    FormErrors,
    Registration,
    create_order,
    exam_choices,
    set_ticket,
    validate,
)
from edge.orders.tables import Audit, Order
from edge.orders.today import VisitRow, unmatched_studies, visits_for_day
from firmware_bridge.boxes import box_summaries
from kiosk.printer_state import recent_printer_report
from kiosk.slip import render_slip
from kiosk.tickets import issue_ticket

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
TEMPLATE_DIR = Path(__file__).with_name("templates")
COOKIE = "edge_console"
LOGIN_COOKIE = "edge_console_login"
SLIP_KEEP_S = 15 * 60.0  # the slip (with its PIN) can be opened this long after registering
PUBLIC = frozenset({"/healthz", "/metrics", "/login"})


@dataclass
class Slip:
    session_id: int
    code: str
    pin: str
    pdf: bytes
    expires: float
    reissued: bool = False
    issued_at: dt.datetime | None = None  # UTC
    valid_until: dt.datetime | None = None  # UTC


@dataclass
class ConsoleContext:
    config: EdgeConfig
    choices: list[ExamChoice]
    wake_sync: Callable[[], None] | None = None
    slips: dict[int, Slip] = field(default_factory=dict)

    def slip(self, order_id: int, session_id: int) -> Slip | None:
        now = time.monotonic()
        for key in [k for k, s in self.slips.items() if s.expires < now]:
            del self.slips[key]
        slip = self.slips.get(order_id)
        return slip if slip is not None and slip.session_id == session_id else None


CONSOLE = web.AppKey("console", ConsoleContext)
SESSION = "console_session"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _ctx(request: web.Request) -> ConsoleContext:
    return request.app[CONSOLE]


def _session(request: web.Request) -> SessionInfo:
    session: SessionInfo = request[SESSION]
    return session


_client = shared.client_address


def _page(template: str, request: web.Request, status: int = 200, **context: Any) -> web.Response:
    """A page with the layout's clinic name, and the logged-in user's name, role and CSRF token."""
    session: SessionInfo | None = request.get(SESSION)
    layout = {"clinic": _ctx(request).config.node.name, "user": session.user if session else "",
              "role": session.role if session else "", "csrf": session.csrf if session else ""}
    return shared.render(template, request, status, **{**layout, **context})


def _set_cookie(request: web.Request, response: web.StreamResponse, name: str, value: str) -> None:
    cfg = _ctx(request).config.console
    response.set_cookie(name, value, httponly=True, samesite="Strict", path="/",
                        secure=cfg.secure_cookies or bool(cfg.tls_cert))  # served over https: never send it in clear


def _forbidden(reason: str) -> web.Response:
    return web.Response(status=403, text=f"Forbidden: {reason}. Reload the page and try again.\n")


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Sessions and CSRF for everything but health, metrics, login and static files."""
    path = request.path
    if path in PUBLIC or path.startswith("/static/"):
        return await handler(request)
    cfg = _ctx(request).config.console
    session = await asyncio.to_thread(accounts.session_for, request.cookies.get(COOKIE), cfg.session_idle_minutes)
    if session is None:
        if request.method == "GET" and not path.startswith("/api/"):
            raise web.HTTPSeeOther("/login")
        return web.Response(status=401 if request.method == "GET" else 403,
                            text="Not logged in (or the session expired): log in again.\n")
    request[SESSION] = session
    if request.method == "POST":
        form = await request.post()
        if not shared.csrf_ok(session.csrf, form.get(shared.CSRF_FIELD)):
            log.warning("console: POST %s by %s refused: missing or wrong CSRF token", path, session.user)
            return _forbidden("the form's security token is missing or old")
    return await handler(request)


def _admin(request: web.Request) -> SessionInfo:
    session = _session(request)
    if session.role != "admin":
        raise web.HTTPForbidden(text="Only an admin may do this.\n")
    return session


# ---------------------------------------------------------------------- login


def _login_token(request: web.Request) -> str:
    """The login form's double-submit token: kept while the browser has one, so a second
    tab (or the browser's favicon request landing here) does not invalidate the first form."""
    return shared.kept_csrf_token(request.cookies.get(LOGIN_COOKIE, ""))


async def login_form(request: web.Request) -> web.StreamResponse:
    token = _login_token(request)
    msg = pages.message_text(request.query.get("msg", ""))
    response = _page("login.html", request, csrf=token, message=msg, typed_user="",
                     no_users=await asyncio.to_thread(accounts.no_users_yet))
    _set_cookie(request, response, LOGIN_COOKIE, token)
    return response


async def login(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    form = await request.post()
    expected = request.cookies.get(LOGIN_COOKIE, "")
    if not shared.csrf_ok(expected, form.get(shared.CSRF_FIELD)):
        log.warning("console: login from %s refused: missing or wrong CSRF token", _client(request))
        return _forbidden("the form's security token is missing or old")
    name, password = str(form.get("user", "")), str(form.get("password", ""))
    cfg = ctx.config.console
    result = await asyncio.to_thread(
        accounts.log_in, name, password, cfg.max_login_failures, cfg.login_lockout_minutes, _client(request),
        accounts.AddressBudget(cfg.login_address_failures, cfg.login_address_window_minutes))
    if not result.ok or result.user_id is None:
        token = _login_token(request)
        response = _page("login.html", request, status=429 if result.wait_s else 401, csrf=token,
                         message=result.message, typed_user=name,
                         no_users=await asyncio.to_thread(accounts.no_users_yet))
        if result.wait_s:
            response.headers["Retry-After"] = str(result.wait_s)
        _set_cookie(request, response, LOGIN_COOKIE, token)
        return response
    cookie, _ = await asyncio.to_thread(accounts.new_session, result.user_id)
    response = web.HTTPSeeOther("/")
    _set_cookie(request, response, COOKIE, cookie)
    response.del_cookie(LOGIN_COOKIE, path="/")
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    await asyncio.to_thread(accounts.end_session, request.cookies.get(COOKIE))
    log.info("console: %s logged out", _session(request).user)
    response = web.HTTPSeeOther("/login?msg=logged_out")
    response.del_cookie(COOKIE, path="/")
    raise response


# ---------------------------------------------------------------------- today


def _today_data() -> tuple[list[VisitRow], list[Any], list[dict[str, Any]]]:
    """Reads only: matching and STAT happen where the images arrive (sync.arrivals), not when someone looks."""
    return visits_for_day(), unmatched_studies(), box_summaries()


def _notes(config: EdgeConfig, visits: list[VisitRow]) -> dict[int, ReportNote]:
    """Each visit's report lines: preliminary report, amended after printing, check-now offered."""
    return report_notes(visits, config.data_dir, config.reports.lookback_days)


def _signature(row: VisitRow, notes: dict[int, ReportNote]) -> str:
    note = notes.get(row.order_id)
    return row.signature + (f"|{note.signature}" if note is not None else "")


def _box_signature(boxes: list[dict[str, Any]]) -> str:
    """What of the ECG panel, when it changes, makes the open Today page reload."""
    return ";".join(f'{b["box_id"]}:{b["connected"]}:{b["recording"]}:{b["battery_pct"]}:{",".join(b["lead_off"])}:'
                    f'{b["armed"]}' for b in boxes)


async def today(request: web.Request) -> web.StreamResponse:
    rows, unmatched, boxes = await asyncio.to_thread(_today_data)
    notes = await asyncio.to_thread(_notes, _ctx(request).config, rows)
    printer = await asyncio.to_thread(recent_printer_report, _ctx(request).config)
    return _page("today.html", request, rows=rows, unmatched=unmatched, boxes=boxes, printer=printer, notes=notes,
                 refresh_s=_ctx(request).config.console.refresh_s,
                 message=pages.message_text(request.query.get("msg", "")),
                 error=pages.error_text(request.query.get("error", "")), box_signature=_box_signature(boxes))


async def api_today(request: web.Request) -> web.StreamResponse:
    """Small: one signature per visit; the page asks for the rows whose signature changed."""
    rows, unmatched, boxes = await asyncio.to_thread(_today_data)
    notes = await asyncio.to_thread(_notes, _ctx(request).config, rows)
    printer = await asyncio.to_thread(recent_printer_report, _ctx(request).config)
    return web.json_response({
        "visits": {str(r.order_id): _signature(r, notes) for r in rows},
        "order": [r.order_id for r in rows],
        "unmatched": [u.study_instance_uid for u in unmatched],
        "boxes": _box_signature(boxes),
        "printer": printer.cause,  # a change reloads the page: the printer banner comes or goes
    })


async def api_rows(request: web.Request) -> web.StreamResponse:
    session = _session(request)
    try:
        wanted = {int(x) for x in request.query.get("ids", "").split(",") if x}
    except ValueError:
        raise web.HTTPBadRequest(text="ids must be numbers\n") from None
    rows = [r for r in await asyncio.to_thread(visits_for_day) if r.order_id in wanted]
    notes = await asyncio.to_thread(_notes, _ctx(request).config, rows)
    return web.json_response({
        str(r.order_id): {"html": shared.render_fragment("visit_row.html", request, row=r, csrf=session.csrf,
                                                         note=notes.get(r.order_id)),
                          "sig": _signature(r, notes)}
        for r in rows
    })


# ---------------------------------------------------------------------- register


async def register_form(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    return _page("register.html", request, choices=ctx.choices, languages=ctx.config.kiosk.languages, form={},
                 errors={})


def _register(ctx: ConsoleContext, form: Registration, language: str, by: str, client: str,
              session_id: int) -> int:
    """Validate, create the order, issue the kiosk ticket and render the slip; returns the order id."""
    patient = validate(form, ctx.choices)
    cfg = ctx.config
    order = create_order(patient, node_id=cfg.node.id, station_ae=cfg.dicom.modality_ae, by=by, client=client)
    try:
        ticket = issue_ticket(order.accession_number, patient.patient_name.replace("^", " "), order.exam,
                              pin_digits=cfg.kiosk.pin_digits, valid_days=cfg.kiosk.ticket_valid_days)
        set_ticket(order.id, ticket.code)
        pdf = render_slip(ticket.code, ticket.pin, cfg.node.name, cfg.kiosk.collect_at, ticket.expires_at, language)
        ctx.slips[order.id] = Slip(session_id, ticket.code, ticket.pin, pdf, time.monotonic() + SLIP_KEEP_S,
                                   issued_at=order.created_at, valid_until=ticket.expires_at)
    except Exception:  # the visit stands; the technician sees that no slip was made
        log.exception("console: order %d registered but its kiosk slip failed", order.id)
    return int(order.id)


async def register(request: web.Request) -> web.StreamResponse:
    ctx, session = _ctx(request), _session(request)
    data = await request.post()
    values = {k: str(data.get(k, ""))[:100] for k in
              ("surname", "given_names", "sex", "birth_date", "id_number", "folder_number", "exam", "language")}
    language = values["language"] if values["language"] in ctx.config.kiosk.languages else ctx.config.kiosk.languages[0]
    form = Registration(**{k: v for k, v in values.items() if k != "language"})
    try:
        order_id = await asyncio.to_thread(_register, ctx, form, language, session.user, _client(request),
                                           session.session_id)
    except FormErrors as exc:
        return _page("register.html", request, status=422, choices=ctx.choices,
                     languages=ctx.config.kiosk.languages, form=values, errors=exc.errors)
    if ctx.wake_sync is not None:  # images kept before the visit was registered (an emergency) find it now
        ctx.wake_sync()
    raise web.HTTPSeeOther(f"/visits/{order_id}/registered")


def _order_row(order_id: int) -> tuple[VisitRow | None, str]:
    order = Order.get_or_none(Order.id == order_id)
    if order is None:
        return None, ""
    day = dt.datetime.strptime(order.scheduled_date, "%Y%m%d").date()
    return next((r for r in visits_for_day(day) if r.order_id == order_id), None), order.modality


async def registered(request: web.Request) -> web.StreamResponse:
    ctx, session = _ctx(request), _session(request)
    order_id = int(request.match_info["order_id"])
    row, modality = await asyncio.to_thread(_order_row, order_id)
    if row is None:
        raise web.HTTPNotFound(text="No such visit.\n")
    slip = ctx.slip(order_id, session.session_id)
    return _page("registered.html", request, row=row, code=slip.code if slip else "", pin=slip.pin if slip else "",
                 modality=modality, reissued=slip.reissued if slip else False,
                 valid_until=slip.valid_until if slip else None)


async def reissue_form(request: web.Request) -> web.StreamResponse:
    """The confirmation before a new slip: the old one stops working, so it is a deliberate step."""
    ctx = _ctx(request)
    row, _ = await asyncio.to_thread(_order_row, int(request.match_info["order_id"]))
    if row is None:
        raise web.HTTPNotFound(text="No such visit.\n")
    return _page("reissue.html", request, row=row, languages=ctx.config.kiosk.languages)


def _reissue(ctx: ConsoleContext, order_id: int, language: str, by: str, client: str, session_id: int) -> None:
    cfg = ctx.config
    ticket = actions.reissue_slip(order_id, by, pin_digits=cfg.kiosk.pin_digits, valid_days=cfg.kiosk.ticket_valid_days,
                                  client=client)
    pdf = render_slip(ticket.code, ticket.pin, cfg.node.name, cfg.kiosk.collect_at, ticket.expires_at, language)
    ctx.slips[order_id] = Slip(session_id, ticket.code, ticket.pin, pdf, time.monotonic() + SLIP_KEEP_S,
                               reissued=True, issued_at=dt.datetime.now(dt.UTC).replace(tzinfo=None),
                               valid_until=ticket.expires_at)


async def slip_pdf(request: web.Request) -> web.StreamResponse:
    slip = _ctx(request).slip(int(request.match_info["order_id"]), _session(request).session_id)
    if slip is None:
        raise web.HTTPNotFound(text="The slip can be opened only for a short while after registering, by the "
                                    "same login. A patient who lost the slip gets a new one with 'Reissue slip' on the Today page.\n")
    return web.Response(body=slip.pdf, content_type="application/pdf",
                        headers={"Content-Disposition": 'inline; filename="slip.pdf"'})


# ---------------------------------------------------------------------- actions


async def visit_action(request: web.Request) -> web.StreamResponse:
    ctx, session = _ctx(request), _session(request)
    order_id = int(request.match_info["order_id"])
    action = request.match_info["action"]
    client = _client(request)
    row, _ = await asyncio.to_thread(_order_row, order_id)
    if row is None:
        raise _error_redirect("/", "no_visit")
    note = (await asyncio.to_thread(_notes, ctx.config, [row])).get(order_id) if action == "check-report" else None
    if not buttons.can_act(action, row, note):  # the page was older than the row: say so, do nothing
        log.info("console: %s on order %d by %s refused: it cannot act now (%s)", action, order_id, session.user,
                 row.state)
        raise _error_redirect("/", f"cannot_{action.replace('-', '_')}")
    try:
        if action == "reissue":
            data = await request.post()
            wanted = str(data.get("language", ""))
            language = wanted if wanted in ctx.config.kiosk.languages else ctx.config.kiosk.languages[0]
            await asyncio.to_thread(_reissue, ctx, order_id, language, session.user, client, session.session_id)
            raise web.HTTPSeeOther(f"/visits/{order_id}/registered")
        if action == "stat":
            await asyncio.to_thread(actions.mark_stat, order_id, session.user, client)
            msg = "stat"
        elif action == "send-now":
            await asyncio.to_thread(actions.send_now, order_id, session.user, client)
            msg = "sent"
        elif action == "retry":
            count = await asyncio.to_thread(actions.retry, order_id, session.user, client)
            msg = "retried" if count else "nothing_to_retry"
        elif action == "reprint":
            await asyncio.to_thread(actions.reprint, order_id, session.user, client)
            msg = "reprint"
        elif action == "check-report":
            await asyncio.to_thread(actions.check_report, order_id, session.user, ctx.config.data_dir, client)
            msg = "report_check"
        else:
            raise web.HTTPNotFound()
    except (actions.ActionError, LookupError) as exc:
        raise _error_redirect("/", exc) from None
    if action in ("stat", "send-now", "retry", "check-report") and ctx.wake_sync is not None:
        ctx.wake_sync()
    raise web.HTTPSeeOther(f"/?msg={msg}")


def _error_redirect(page: str, error: Exception | str) -> web.HTTPSeeOther:
    """Back to ``page`` with ``?error=CODE``: the URL carries a code, never words (pages.ERRORS).

    An error with a ``code`` uses it; one whose text is a known message gets that message's
    code; anything else reads "could not be done" and its text goes to the log instead.
    """
    if isinstance(error, str):
        code = error
    else:
        code = getattr(error, "code", None) or _ERROR_BY_TEXT.get(str(error), "failed")
        if code not in pages.ERRORS or code == "failed":
            log.warning("console: action on %s failed: %s", page, error)
            code = "failed"
    return web.HTTPSeeOther(f"{page}?error={code}")


_ERROR_BY_TEXT = {text: code for code, text in pages.ERRORS.items()}


async def assign(request: web.Request) -> web.StreamResponse:
    session = _session(request)
    data = await request.post()
    try:
        order_id = int(str(data.get("order", "")))
    except ValueError:
        raise _error_redirect("/", "choose_visit") from None
    try:
        await asyncio.to_thread(assign_study, str(data.get("study", "")), order_id, session.user, _client(request))
    except AssignError as exc:
        raise _error_redirect("/", exc) from None
    raise web.HTTPSeeOther("/?msg=assigned")


async def arm_box(request: web.Request) -> web.StreamResponse:
    session = _session(request)
    data = await request.post()
    box = str(data.get("box", ""))[:64]
    try:
        order_id = int(str(data.get("order", "")))
        await asyncio.to_thread(actions.arm, box, order_id, session.user, _client(request))
    except (ValueError, actions.ActionError):
        raise _error_redirect("/", "choose_ecg_patient") from None
    raise web.HTTPSeeOther("/?msg=armed")


# ---------------------------------------------------------------------- admin and audit


async def users(request: web.Request) -> web.StreamResponse:
    _admin(request)
    listing = await asyncio.to_thread(accounts.list_users)
    return _page("users.html", request, users=listing, message=pages.message_text(request.query.get("msg", "")),
                 error=pages.error_text(request.query.get("error", "")))


async def users_add(request: web.Request) -> web.StreamResponse:
    session = _admin(request)
    data = await request.post()
    try:
        await asyncio.to_thread(accounts.add_user, str(data.get("name", "")), str(data.get("role", "")),
                                str(data.get("password", "")), session.user)
    except accounts.AccountError as exc:
        raise _error_redirect("/users", exc) from None
    raise web.HTTPSeeOther("/users?msg=user_added")


async def users_unlock(request: web.Request) -> web.StreamResponse:
    session = _admin(request)
    data = await request.post()
    try:
        await asyncio.to_thread(accounts.unlock_user, str(data.get("name", "")), session.user)
    except accounts.AccountError as exc:
        raise _error_redirect("/users", exc) from None
    raise web.HTTPSeeOther("/users?msg=unlocked")


def _audit_rows(limit: int = 300) -> list[dict[str, Any]]:
    return [
        {"at": a.at, "at_utc": a.at.isoformat(timespec="seconds") + "Z", "user": a.user, "action": a.action,
         "accession_number": a.accession_number, "detail": a.detail, "client": a.client}
        for a in Audit.select().order_by(Audit.id.desc()).limit(limit)
    ]


async def audit(request: web.Request) -> web.StreamResponse:
    rows = await asyncio.to_thread(_audit_rows)
    return _page("audit.html", request, rows=rows)


def add_routes(app: web.Application, config: EdgeConfig, wake_sync: Callable[[], None] | None = None) -> None:
    """The console's pages on the app that already serves /healthz and /metrics."""
    app[CONSOLE] = ConsoleContext(config, exam_choices(config.console.exam_names(), config.console.xray_modality),
                                  wake_sync)
    shared.setup_templates(app, TEMPLATE_DIR, **pages.TEMPLATE_GLOBALS, **buttons.TEMPLATE_GLOBALS,
                           **pages.ClinicClock(ZoneInfo(config.node.timezone)).template_globals())
    app.middlewares.append(shared.security_headers())
    app.middlewares.append(guard)
    r = app.router
    r.add_get("/login", login_form)
    r.add_post("/login", login)
    r.add_post("/logout", logout)
    r.add_get("/", today)
    r.add_get("/api/today", api_today)
    r.add_get("/api/rows", api_rows)
    r.add_get("/register", register_form)
    r.add_post("/register", register)
    r.add_get(r"/visits/{order_id:\d+}/registered", registered)
    r.add_get(r"/visits/{order_id:\d+}/slip.pdf", slip_pdf)
    r.add_get(r"/visits/{order_id:\d+}/reissue", reissue_form)
    r.add_post(r"/visits/{order_id:\d+}/{action:stat|send-now|retry|reprint|check-report|reissue}", visit_action)
    r.add_post("/assign", assign)
    r.add_post("/ecg/arm", arm_box)
    r.add_get("/users", users)
    r.add_post("/users/add", users_add)
    r.add_post("/users/unlock", users_unlock)
    r.add_get("/audit", audit)
    r.add_static("/static/", STATIC_DIR)
