"""``edge serve kiosk``: the patient kiosk web app (aiohttp, server-rendered) and its service.

Screens: language → slip code → PIN → "not ready yet" or a preview → Print → "take your
page" (or "please ask at reception"). Every URL is fixed: what the patient enters travels
only in POST bodies, and the server keeps it in a session the idle timeout forgets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import ipaddress
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pypdf import PdfReader

from edge import web as shared
from edge.http_server import HttpLimits, HttpListener, serve_app
from edge.service import BackgroundTasks, ServiceSetupError
from kiosk import metrics, pages
from kiosk.const import PrinterState
from kiosk.i18n import load_catalog
from kiosk.patient_texts import PatientTexts, report_headings
from kiosk.printing import CupsPrinter, EscposPrinter, PrinterBackend
from kiosk.printjob import FilmLink, build_page, print_ticket_report
from kiosk.sessions import COOKIE, KioskSession, SessionStore
from kiosk.tickets import GuardSettings, Lookup, finish_print, look_up, ticket_report
from kiosk.viewer_token import load_or_create_key

if TYPE_CHECKING:  # the whole config is the roof's; a part only reads it
    from edge.node.config import EdgeConfig

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
TEMPLATE_DIR = Path(__file__).with_name("templates")


@dataclass
class KioskContext:
    """Everything the handlers share, built once at start-up."""

    config: EdgeConfig
    sessions: SessionStore
    printer: PrinterBackend
    guard: GuardSettings
    link: FilmLink
    texts: PatientTexts
    printer_state: PrinterState = "unknown"


KIOSK = web.AppKey("kiosk", KioskContext)


def guard_settings(config: EdgeConfig) -> GuardSettings:
    k = config.kiosk
    return GuardSettings(
        max_pin_failures=k.max_pin_failures, lockout_minutes=k.lockout_minutes,
        throttle_after_failures=k.throttle_after_failures, throttle_window_s=k.throttle_window_s,
        throttle_max_delay_s=k.throttle_max_delay_s, throttle_node_failures=k.throttle_node_failures,
        print_limit=k.print_limit, print_preliminary=k.print_preliminary,
        report_estimate_hours=k.report_estimate_hours,
    )


def make_printer(config: EdgeConfig) -> PrinterBackend:
    k = config.kiosk
    if k.printer == "escpos":
        return EscposPrinter(config.path(k.escpos_device) or Path(k.escpos_device))
    return CupsPrinter(k.cups_queue, k.cups_server)


def make_context(config: EdgeConfig) -> KioskContext:
    """Raises viewer_token.KeyFileError when the token key cannot be read or made."""
    k = config.kiosk
    key = load_or_create_key(config.data_dir, config.path(k.token_key_file))
    return KioskContext(
        config=config,
        sessions=SessionStore(k.idle_timeout_s),
        printer=make_printer(config),
        guard=guard_settings(config),
        link=FilmLink(k.viewer_url_template, key, config.node.id, k.token_days),
        texts=PatientTexts.from_config(config),
    )


# ---------------------------------------------------------------------- helpers


def _ctx(request: web.Request) -> KioskContext:
    return request.app[KIOSK]


def _session(request: web.Request) -> KioskSession | None:
    return _ctx(request).sessions.get(request.cookies.get(COOKIE))


def _frame(request: web.Request, session: KioskSession | None) -> pages.Frame:
    ctx = _ctx(request)
    language = session.language if session else ctx.config.kiosk.languages[0]
    k = ctx.config.kiosk
    warning = min(k.idle_warning_s, k.idle_timeout_s / 2)  # a short idle timeout keeps half its time uncounted
    return pages.Frame(load_catalog(language), ctx.config.node.name, k.idle_timeout_s, warning)


def _page(request: web.Request, frame: pages.Frame, template: str, page: str, title: str, home: bool = True,
          refresh: float | None = None, **context: Any) -> web.Response:  # template values, as render takes them
    """A screen from ``template`` in the frame's language; ``refresh``: reload after that many seconds."""
    response = shared.render(template, request, **frame.context(page, title, home), **context)
    if refresh is not None:
        response.headers["Refresh"] = str(refresh)
    return response


def _message(request: web.Request, frame: pages.Frame, page: str, title: str, text: str,
             pictogram: str = "warning", good: bool = False) -> web.Response:
    return _page(request, frame, "message.html", page, title, text=text, pictogram=pictogram, good=good)


def _to(path: str) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(path)


_client = shared.client_address
Handler = shared.Handler
Middleware = shared.Middleware
NOT_THIS_SCREEN = "403: this kiosk answers only its own screen.\n"


def screen_only(allowed_clients: Sequence[str]) -> Middleware:
    """Refuse every client but the kiosk screen ([kiosk] allowed_clients): the LAN gets a 403.

    The kiosk shows patients' reports; a laptop on the clinic's Wi-Fi must not be a kiosk.
    An IPv4 client reaching a dual-stack socket (``::ffff:a.b.c.d``) counts as its IPv4 address.
    """
    networks = tuple(ipaddress.ip_network(entry, strict=False) for entry in allowed_clients)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        remote = request.remote or ""
        address = shared.client_ip(request)
        if address is None or not any(address in network for network in networks):
            log.warning("kiosk: refused %s %r from %s: not in [kiosk] allowed_clients",
                        request.method, request.path[:64], remote[:64] or "unknown")
            return web.Response(status=403, text=NOT_THIS_SCREEN, content_type="text/plain")
        return await handler(request)

    return middleware


# ---------------------------------------------------------------------- screens


async def start(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    ctx.sessions.drop(request.cookies.get(COOKIE))
    frame = dataclasses.replace(_frame(request, None), warning_s=0)  # nobody's report to keep: no countdown
    # Nobody has chosen yet: the screen speaks every configured language, each in its own words.
    response = _page(request, frame, "languages.html", "language", ctx.config.node.name, home=False,
                     choices=pages.language_choices(ctx.config.kiosk.languages))
    response.del_cookie(COOKIE)
    return response


async def reset(request: web.Request) -> web.StreamResponse:
    _ctx(request).sessions.drop(request.cookies.get(COOKIE))
    response = _to("/")
    response.del_cookie(COOKIE)
    raise response


async def choose_language(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    form = await request.post()
    language = str(form.get("lang", ""))
    if language not in ctx.config.kiosk.languages:
        raise _to("/")
    ctx.sessions.drop(request.cookies.get(COOKIE))
    session = ctx.sessions.new(language)
    response = _to("/code")
    response.set_cookie(COOKIE, session.id, httponly=True, samesite="Strict", path="/")
    raise response


async def code_screen(request: web.Request) -> web.StreamResponse:
    session = _session(request)
    if session is None:
        raise _to("/")
    message, session.message = session.message, ""
    session.code, session.ticket_id = "", None
    frame = _frame(request, session)
    return _page(request, frame, "code.html", "code", frame.t("scan_title"), message=message)


async def code_entered(request: web.Request) -> web.StreamResponse:
    from kiosk.tickets import normalise_code

    session = _session(request)
    if session is None:
        raise _to("/")
    form = await request.post()
    code = normalise_code(str(form.get("code", ""))[:40])
    if code is None:
        session.message = load_catalog(session.language)("code_invalid")
        raise _to("/code")
    session.code = code
    raise _to("/pin")


async def pin_screen(request: web.Request) -> web.StreamResponse:
    session = _session(request)
    if session is None:
        raise _to("/")
    if not session.code:
        raise _to("/code")
    message, session.message = session.message, ""
    frame = _frame(request, session)
    return _page(request, frame, "pin.html", "pin", frame.t("pin_title"), digits=_ctx(request).config.kiosk.pin_digits,
                 message=message)


async def pin_entered(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    session = _session(request)
    if session is None:
        raise _to("/")
    if not session.code:
        raise _to("/code")
    form = await request.post()
    pin = str(form.get("pin", ""))[:16]
    result: Lookup = await asyncio.to_thread(
        look_up, session.code, pin, _client(request), ctx.guard, ctx.config.data_dir
    )
    del pin
    metrics.LOOKUPS.labels(result.outcome).inc()
    t = load_catalog(session.language)
    if result.outcome == "ready":
        session.ticket_id = result.ticket_id
        raise _to("/report")
    if result.outcome == "not_ready":
        session.ticket_id, session.estimate_hours, session.wait = None, result.estimate_hours, result.wait
        raise _to("/not-ready")
    if result.outcome == "wrong_pin":  # an unknown code reads the same: no oracle for which codes exist
        text = t("wrong_pin")
        if result.tries_left is not None:
            text += " " + t("tries_left", count=result.tries_left)
        session.message = text
        raise _to("/pin")
    if result.outcome == "throttled":
        session.message = t("throttled", seconds=max(1, round(result.wait_s)))
        raise _to("/pin")
    if result.outcome == "bad_code":
        session.message = t("code_invalid")
        raise _to("/code")
    if result.outcome == "locked":
        session.message = t("locked", minutes=max(1, round(result.wait_s / 60)))
    else:  # expired
        session.message = t("expired")
    session.code = ""
    raise _to("/message")


async def message_screen(request: web.Request) -> web.StreamResponse:
    session = _session(request)
    if session is None or not session.message:
        raise _to("/")
    frame = _frame(request, session)
    message, session.message = session.message, ""
    return _message(request, frame, "message", frame.t("ask_reception"), message)


async def not_ready_screen(request: web.Request) -> web.StreamResponse:
    session = _session(request)
    if session is None or session.estimate_hours is None:
        raise _to("/")
    frame = _frame(request, session)
    return _message(request, frame, "not-ready", frame.t("not_ready_title"),
                    pages.not_ready_text(frame.t, session.estimate_hours, session.wait), "clock")


def _pdf_pages(path: Path | None) -> int:
    if path is None:
        return 0
    try:
        return len(PdfReader(io.BytesIO(path.read_bytes())).pages)
    except Exception:  # a damaged file still gets printed (or fails there, audited)
        return 1


async def report_screen(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    session = _session(request)
    if session is None or session.ticket_id is None:
        raise _to("/")
    report = await asyncio.to_thread(ticket_report, session.ticket_id, ctx.config.data_dir, ctx.guard)
    if report is None:
        raise _to("/reset")
    pdf_pages = await asyncio.to_thread(_pdf_pages, report.report.pdf_path) if report.report.kind == "pdf" else 0
    ctx.printer_state = await asyncio.to_thread(ctx.printer.state)
    frame = _frame(request, session)
    view = build_page(report, ctx.config.node.name, None, ctx.config.node.phone,
                      ctx.texts.exam(report.exam, session.language))
    return _page(
        request, frame, "report.html", "report", frame.t("report_ready"), facts=view.facts(frame.t),
        amended=view.amended_text(frame.t), amended_extra=report.amended_extra and report.prints_left > 0,
        report_text=report_headings(report.report.text, frame.t) if report.report.kind == "sr" else "", pdf_pages=pdf_pages,
        prints_left=report.prints_left, printer_ok=ctx.printer_state not in ("offline", "paper_out"),
    )


async def print_pressed(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    session = _session(request)
    if session is None or session.ticket_id is None:
        raise _to("/")
    k = ctx.config
    outcome = await asyncio.to_thread(
        print_ticket_report, session.ticket_id, _client(request), session.language, ctx.printer, ctx.guard,
        k.data_dir, k.node.name, ctx.link, k.node.phone, ctx.texts,
    )
    t = load_catalog(session.language)
    if outcome.outcome == "printed":
        session.audit_id, session.job, session.study_uid = outcome.audit_id, outcome.job, outcome.study_uid
        raise _to("/printing")
    if outcome.outcome == "gone":
        raise _to("/reset")
    session.message = t("print_limit") if outcome.outcome == "limit_reached" else t("printer_problem")
    raise _to("/message")


async def printing_screen(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    session = _session(request)
    if session is None or not session.job:
        raise _to("/")
    frame = _frame(request, session)
    state = await asyncio.to_thread(ctx.printer.job_state, session.job)
    if state == "pending":
        return _page(request, frame, "printing.html", "printing", frame.t("printing"), refresh=1)
    if state == "held":
        if session.audit_id is not None:
            await asyncio.to_thread(finish_print, session.audit_id, "failed", session.job, "job held by the printer")
            metrics.PRINTS.labels("failed").inc()
            log.warning("kiosk: job %s held by the printer", session.job)
        session.job = ""
        ctx.printer_state = await asyncio.to_thread(ctx.printer.state)
        return _message(request, frame, "printer-problem", frame.t("ask_reception"), frame.t("printer_problem"))
    session.job = ""
    return _message(request, frame, "printed", frame.t("printed_title"), frame.t("printed"), "check", good=True)


async def metrics_endpoint(request: web.Request) -> web.Response:
    payload = await asyncio.to_thread(generate_latest, REGISTRY)
    return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})


# ---------------------------------------------------------------------- app and service


async def _watch_printer(app: web.Application) -> AsyncIterator[None]:
    """Keep the printer gauge current even when nobody prints (ops see paper out early)."""
    ctx = app[KIOSK]

    async def loop() -> None:
        last: PrinterState | None = None
        while True:
            try:
                ctx.printer_state = await asyncio.to_thread(ctx.printer.state)
            except Exception:
                log.exception("kiosk: printer check failed")
            if ctx.printer_state != last:
                log.info("kiosk: printer (%s) is %s", ctx.printer.name, ctx.printer_state)
                last = ctx.printer_state
            await asyncio.sleep(ctx.config.kiosk.printer_check_interval_s)

    tasks = BackgroundTasks("kiosk")
    tasks.start(loop(), name="kiosk-printer")
    yield
    await tasks.stop()


def make_app(config: EdgeConfig, context: KioskContext | None = None) -> web.Application:
    app = web.Application(middlewares=[shared.security_headers(), screen_only(config.kiosk.allowed_clients)],
                          client_max_size=64 * 1024)
    shared.setup_templates(app, TEMPLATE_DIR, **pages.TEMPLATE_GLOBALS)
    app[KIOSK] = context or make_context(config)
    app.cleanup_ctx.append(_watch_printer)
    app.router.add_get("/", start)
    app.router.add_get("/reset", reset)
    app.router.add_post("/language", choose_language)
    app.router.add_get("/code", code_screen)
    app.router.add_post("/code", code_entered)
    app.router.add_get("/pin", pin_screen)
    app.router.add_post("/pin", pin_entered)
    app.router.add_get("/message", message_screen)
    app.router.add_get("/not-ready", not_ready_screen)
    app.router.add_get("/report", report_screen)
    app.router.add_post("/print", print_pressed)
    app.router.add_get("/printing", printing_screen)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_static("/static/", STATIC_DIR, show_index=False)
    return app


class KioskSetupError(ServiceSetupError):
    """The kiosk cannot start (token key unreadable); the message says why."""


class KioskService:
    """Runs the kiosk app on [kiosk] port; start()/stop() like every service."""

    name = "kiosk"

    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        self._listener: HttpListener | None = None

    async def start(self) -> None:
        from kiosk.viewer_token import KeyFileError

        try:
            context = await asyncio.to_thread(make_context, self.config)
        except KeyFileError as exc:
            raise KioskSetupError(str(exc)) from None
        k = self.config.kiosk
        limits = HttpLimits(k.http_header_timeout_s, k.http_keepalive_s, k.http_max_connections)
        self._listener = await serve_app(make_app(self.config, context), "kiosk", k.bind_address, k.port, limits)
        log.info("kiosk: listening on %s:%d, printing to %s", k.bind_address, k.port, context.printer.name)

    async def stop(self) -> None:
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
            log.info("kiosk: stopped")
