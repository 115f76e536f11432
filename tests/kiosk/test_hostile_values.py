"""A value from a DICOM header, the cloud's report or the registration desk is printed as text, never as markup
or printer commands: the page renders, shows it literally, opens no file, and the print job goes through."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import datetime as dt
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kiosk.i18n import load_catalog
from kiosk.page_text import plain
from kiosk.receipt import render_receipt
from kiosk.report_pdf import ReportPage, readable_date, render_report_pdf
from kiosk.slip import render_slip
from sync.reports import ReportView
from tests.kiosk.conftest import issue, seed_study
from tests.kiosk.cups_peer import CupsPeer
from tests.kiosk.helpers import audit

REPO = Path(__file__).resolve().parents[2]

HOSTILE = [
    "<b>",
    "</para>",
    '<img src="/etc/hostname"/>',
    "&",
    "&amp;lt; &#60; &nbsp;",
    "<font size=300>big",
    "<para><br/>",
    '<a href="file:///etc/passwd">link</a>',
    "]]><![CDATA[",
    "Dr \x1b[2J\x1bd\x05 Nkosi\x00",  # terminal / ESC-POS commands
    "\u202eevil",  # a bidi override is text, not a command: kept
]

_opened: list[str] | None = None


def _watch_open(event: str, args: tuple[Any, ...]) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes)):
        _opened.append(str(args[0]))


sys.addaudithook(_watch_open)  # audit hooks cannot be removed: this one records only inside files_opened()


@pytest.fixture
def files_opened() -> Iterator[list[str]]:
    """Every file this process opens while the test runs (Python's audit hook)."""
    global _opened
    _opened = []
    try:
        yield _opened
    finally:
        _opened = None


def pdf_text(pdf: bytes, where: Path) -> str:
    path = where / "page.pdf"
    path.write_bytes(pdf)
    text = subprocess.run(["pdftotext", "-enc", "UTF-8", str(path), "-"], capture_output=True, text=True,
                          check=True, timeout=60).stdout
    return squash(text)


def squash(text: str) -> str:
    """Without white space: a long value wraps inside its cell, and pdftotext breaks it there."""
    return "".join(text.split())


def report(text: str) -> ReportView:
    return ReportView("1.2.826.0.1.3680043.8.498.1", "1.2.3.4", "sr", text, None, Path("r.dcm"), "COMPLETE",
                      "VERIFIED", "20261124101500", dt.datetime(2026, 11, 24))


def hostile_page(value: str) -> ReportPage:
    """Every field the printed page shows carries ``value``, tagged so each can be found."""
    return ReportPage(
        clinic_name=f"C1 {value}", patient_name=f"P1 {value}", exam=f"E1 {value}", study_date=value,
        report=report(f"Findings:\n  R1 {value}\n    R2 {value} and more {value}"),
        viewer_url="https://viewer.example/x?token=abc", link_expires=dt.date(2026, 12, 24),
        printed_at=dt.datetime(2026, 11, 24, 9, 0),
    )


@pytest.mark.parametrize("value", HOSTILE, ids=repr)
def test_every_field_on_the_report_page_prints_literally(value: str, tmp_path: Path, files_opened: list[str]) -> None:
    pdf = render_report_pdf(hostile_page(value), load_catalog("en"))
    text = pdf_text(pdf, tmp_path)
    shown = squash(plain(value))
    for tag in ("C1", "P1", "E1", "R1", "R2"):
        assert f"{tag}{shown}" in text, (tag, text)
    assert squash(plain(readable_date(value))) in text
    assert "Patient" in text and "Doctor'sreport" in text  # the page around them is intact
    assert not [f for f in files_opened if "hostname" in f or "passwd" in f]
    assert b"/Subtype /Image" not in pdf  # the QR is vector squares: no image was embedded


@pytest.mark.parametrize("value", HOSTILE, ids=repr)
def test_a_worded_heading_leaves_the_hostile_text_after_it_literal(value: str, tmp_path: Path) -> None:
    zu = load_catalog("zu")
    page = dataclasses.replace(hostile_page(value), report=report(f"Finding: R1 {value}"))
    text = pdf_text(render_report_pdf(page, zu), tmp_path)
    assert squash(f"{zu('sr_finding')}: R1 {plain(value)}") in text, text
    benign = dataclasses.replace(hostile_page("x" * len(value)), report=report(f"Finding: R1 {'x' * len(value)}"))
    receipt = render_receipt(page, zu)
    assert f"{zu('sr_finding')}: R1".encode() in receipt
    assert _commands(receipt) == _commands(render_receipt(benign, zu))  # no printer command came in with it


def test_a_huge_hostile_report_renders_in_seconds_not_minutes(tmp_path: Path) -> None:
    """ReportLab lays out one long paragraph in quadratic time (this text took ~35 s as one line each; ~1 s now)."""
    text = "\n".join([("<b>" + "y" * 100 + " ") * 2000, " " * 400 + "deep", "word " * 40000, "z" * 200000])
    started = time.monotonic()
    pdf = render_report_pdf(dataclasses.replace(hostile_page("x"), report=report(text)), load_catalog("en"))
    assert time.monotonic() - started < 15  # a generous bound for a busy box
    shown = pdf_text(pdf, tmp_path)
    assert "deep" in shown and "<b>yyyy" in shown


@pytest.mark.parametrize("value", HOSTILE, ids=repr)
def test_the_slip_prints_the_clinic_and_place_literally(value: str, tmp_path: Path, files_opened: list[str]) -> None:
    pdf = render_slip("4929140009", "482913", f"C1 {value}"[:40], f"K1 {value}", dt.date(2027, 2, 1), "en")
    text = pdf_text(pdf, tmp_path)
    assert f"K1{squash(plain(value))}" in text and squash(plain(f"C1 {value}"[:40])) in text
    assert not [f for f in files_opened if "hostname" in f or "passwd" in f]


def _commands(receipt: bytes) -> list[bytes]:
    """Every printer command in an ESC/POS stream: each control byte (but line feed) with the two after it."""
    return [m.group(0) for m in re.finditer(rb"[\x00-\x09\x0b-\x1f\x7f].{0,2}", receipt, re.DOTALL)]


@pytest.mark.parametrize("value", HOSTILE, ids=repr)
def test_the_receipt_gets_no_printer_command_from_a_value(value: str) -> None:
    t = load_catalog("en")
    benign = render_receipt(hostile_page("x" * len(value)), t)
    hostile = render_receipt(hostile_page(value), t)
    assert _commands(hostile) == _commands(benign)  # the same commands, in the same order
    printed = hostile.decode("cp437", errors="replace")
    if value.isascii():
        assert plain(value).strip()[:10] in printed


def test_every_paragraph_on_paper_is_made_by_page_text() -> None:
    """Escaping by default: a new field cannot forget it, since only kiosk/page_text.py may build a Paragraph."""
    offenders = []
    for package in ("kiosk", "edge", "sync", "firmware_bridge"):
        for source in (REPO / package).rglob("*.py"):
            if source == REPO / "kiosk" / "page_text.py":
                continue
            tree = ast.parse(source.read_text(), str(source))
            for node in ast.walk(tree):
                named = (isinstance(node, ast.Name) and node.id in ("Paragraph", "XPreformatted", "Preformatted")) or (
                    isinstance(node, ast.Attribute) and node.attr in ("Paragraph", "XPreformatted"))
                imported = isinstance(node, ast.ImportFrom) and any(
                    a.name in ("Paragraph", "XPreformatted", "Preformatted") for a in node.names)
                if named or imported:
                    offenders.append(f"{source.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


# ---------------------------------------------------------------------- through the kiosk to a real CUPS


def jar() -> aiohttp.CookieJar:
    return aiohttp.CookieJar(unsafe=True)


async def print_at_kiosk(url: str, code: str, pin: str) -> tuple[str, str]:
    """A patient's walk with a plain HTTP client: (the preview page's HTML, the last page's name)."""
    async with aiohttp.ClientSession(cookie_jar=jar()) as http:
        await http.post(url + "/language", data={"lang": "en"})
        await http.post(url + "/code", data={"code": code})
        async with http.post(url + "/pin", data={"pin": pin}) as answer:
            preview = await answer.text()
        async with http.post(url + "/print", allow_redirects=False) as answer:
            assert answer.headers["Location"] == "/printing", await answer.text()
        for _ in range(300):
            async with http.get(url + "/printing") as answer:
                page = re.search(r'data-page="([a-z-]+)"', await answer.text())
            assert page is not None
            if page.group(1) != "printing":
                return preview, page.group(1)
            await asyncio.sleep(0.1)
    raise AssertionError("the job never left the queue")


def test_hostile_values_from_the_dr_the_cloud_and_the_desk_print_on_a_real_cups(
    cups: CupsPeer, kiosk_factory: Any, tmp_path: Path
) -> None:
    node = kiosk_factory(clinic_name="Ikhaya & <b>Clinic</b>", cups_server=cups.server, cups_queue="kiosk")
    seed_study(node.data_dir, "ACC-X1", study_date="<b>",  # StudyDate as the spool keeps it (8 chars at most)
               report_text='Findings:\n  </para><img src="/etc/hostname"/> & <font size=300>huge</font>')
    ticket = issue(node.data_dir, "ACC-X1", '<img src="/etc/hostname"/> Dlamini', "<font size=300>Chest</font>")
    node.start()
    before = len(list(cups.pdf_dir.rglob("*.pdf")))
    preview, last = asyncio.run(print_at_kiosk(node.url, ticket.code, ticket.pin))
    assert "&lt;img src=&quot;/etc/hostname&quot;/&gt; Dlamini" in preview and "<img src=" not in preview
    assert last == "printed"
    text = pdf_text(cups.wait_for_pdfs(before + 1)[-1].read_bytes(), tmp_path)
    for literal in ('<img src="/etc/hostname"/> Dlamini', "<font size=300>Chest</font>",
                    '</para><img src="/etc/hostname"/> & <font size=300>huge</font>', "Ikhaya & <b>Clinic</b>"):
        assert squash(literal) in text, (literal, text)
    assert re.search(r"<b>(?!Clinic)", text), text  # the study date, in its own cell of the details
    assert [e["outcome"] for e in audit(node) if e["action"] == "print"] == ["printed"]
