"""The kiosk's server-rendered pages: plain HTML, every string from the catalog, escaped."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from kiosk.i18n import Catalog, load_catalog
from kiosk.icons import icon


@dataclass(frozen=True)
class Frame:
    """What every page shares."""

    t: Catalog
    clinic_name: str
    idle_s: float


def page(frame: Frame, name: str, title: str, body: str, home: bool = True) -> str:
    t = frame.t
    idle = int(frame.idle_s)
    home_link = (
        f'<a class="btn small" href="/reset" id="start-again">{icon("home", 36)}{escape(t("start_again"))}</a>'
        if home else ""
    )
    return (
        f'<!doctype html><html lang="{escape(t.language)}"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title>"
        '<link rel="stylesheet" href="/static/kiosk.css">'
        f'<noscript><meta http-equiv="refresh" content="{idle};url=/reset"></noscript>'
        '<script src="/static/kiosk.js" defer></script></head>'
        f'<body data-idle="{idle}" data-page="{escape(name)}">'
        f'<header><span class="clinic">{escape(frame.clinic_name)}</span>{home_link}</header>'
        f"<main>{body}</main>"
        f'<footer>{icon("help", 40)}<span>{escape(t("ask_reception"))}</span></footer></body></html>'
    )


def notice(text: str, kind: str = "", pictogram: str = "warning") -> str:
    return f'<div class="notice {kind}" role="status">{icon(pictogram)}<span>{escape(text)}</span></div>'


def languages_page(frame: Frame, languages: Sequence[str]) -> str:
    buttons = []
    for lang in languages:
        c = load_catalog(lang)
        buttons.append(
            f'<button class="btn" type="submit" name="lang" value="{escape(lang)}" lang="{escape(lang)}">'
            f'{escape(c("lang_name"))}<small>{escape(c("choose_language"))}</small></button>'
        )
    body = (
        f'<h1>{icon("globe", 64)}{escape(frame.t("welcome"))}</h1>'
        f'<form method="post" action="/language" class="langs">{"".join(buttons)}</form>'
    )
    return page(frame, "language", frame.t("welcome"), body, home=False)


def _keypad(t: Catalog) -> str:
    keys = "".join(f'<button type="button" data-key="{d}">{d}</button>' for d in "123456789")
    return (
        f'<div class="keypad">{keys}'
        f'<button type="button" data-key="back" aria-label="{escape(t("delete"))}">{icon("back", 40)}</button>'
        '<button type="button" data-key="0">0</button>'
        f'<button type="submit" class="ok" aria-label="{escape(t("next"))}">{icon("next", 44)}</button></div>'
    )


def code_page(frame: Frame, message: str = "") -> str:
    t = frame.t
    body = (
        f'<h1>{icon("barcode", 64)}{escape(t("scan_title"))}</h1>'
        f"<p>{escape(t('scan_help'))}</p>{notice(message) if message else ''}"
        '<form method="post" action="/code" class="entry" autocomplete="off">'
        f'<div><label for="code">{escape(t("code_label"))}</label><br>'
        '<input class="field" id="code" name="code" inputmode="numeric" autocomplete="off" maxlength="20" autofocus>'
        f'<div class="actions"><button class="btn big" type="submit">{icon("next")}{escape(t("next"))}</button></div></div>'
        f"{_keypad(t)}</form>"
    )
    return page(frame, "code", t("scan_title"), body)


def pin_page(frame: Frame, digits: int, message: str = "") -> str:
    t = frame.t
    body = (
        f'<h1>{icon("key", 64)}{escape(t("pin_title"))}</h1>'
        f"<p>{escape(t('pin_help', digits=digits))}</p>{notice(message) if message else ''}"
        '<form method="post" action="/pin" class="entry" autocomplete="off">'
        f'<div><label for="pin">{escape(t("pin_label"))}</label><br>'
        f'<input class="field" id="pin" name="pin" type="password" inputmode="numeric" autocomplete="off" maxlength="{digits}" autofocus>'
        f'<div class="actions"><button class="btn big" type="submit">{icon("next")}{escape(t("next"))}</button></div></div>'
        f"{_keypad(t)}</form>"
    )
    return page(frame, "pin", t("pin_title"), body)


def message_page(frame: Frame, name: str, title: str, text: str, pictogram: str = "warning", good: bool = False) -> str:
    body = (
        f"<h1>{icon(pictogram, 64)}{escape(title)}</h1>{notice(text, 'good' if good else '', pictogram)}"
        f'<div class="actions"><a class="btn big" href="/reset" id="finish">{icon("home")}{escape(frame.t("finish"))}</a></div>'
    )
    return page(frame, name, title, body)


def not_ready_page(frame: Frame, estimate_hours: float) -> str:
    t = frame.t
    if estimate_hours <= 1.5:
        when = t("not_ready_hour")
    elif estimate_hours <= 12:
        when = t("not_ready_hours", hours=round(estimate_hours))
    else:
        when = t("not_ready_tomorrow")
    return message_page(frame, "not-ready", t("not_ready_title"), when, "clock")


def report_page(
    frame: Frame,
    patient_name: str,
    exam: str,
    date: str,
    report_text: str,
    pdf_pages: int,
    prints_left: int,
    printer_ok: bool,
) -> str:
    t = frame.t
    report = (
        f'<div class="report">{escape(report_text)}</div>' if report_text
        else notice(t("report_pages", pages=pdf_pages), "good", "document")
    )
    if prints_left <= 0:
        action = notice(t("print_limit"))
    elif not printer_ok:
        action = notice(t("printer_problem"))
    else:
        action = (
            f'<p>{escape(t("prints_left", count=prints_left))}</p>'
            '<form method="post" action="/print" class="actions">'
            f'<button class="btn big" type="submit" id="print">{icon("printer", 56)}{escape(t("print"))}</button></form>'
        )
    body = (
        f'<h1>{icon("document", 64)}{escape(t("report_ready"))}</h1>'
        f'<dl class="facts"><dt>{escape(t("patient"))}</dt><dd>{escape(patient_name)}</dd>'
        f'<dt>{escape(t("exam"))}</dt><dd>{escape(exam or "-")}</dd>'
        f'<dt>{escape(t("date"))}</dt><dd>{escape(date)}</dd></dl>'
        f'<h2>{escape(t("report_heading"))}</h2>{report}{action}'
    )
    return page(frame, "report", t("report_ready"), body)


def printing_page(frame: Frame) -> str:
    t = frame.t
    body = (
        f'<h1>{icon("printer", 64)}{escape(t("printing"))}</h1>'
    )
    return page(frame, "printing", t("printing"), body)
