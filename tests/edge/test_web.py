"""The console's and the kiosk's pages: escaped by their templates, with one set of security headers.

A patient name typed at the desk, an exam from the clinic's config and an accession as the
database holds it reach the technician's Today page and the patient's report screen as
text, never as markup; and no module of either app assembles HTML by hand any more.
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp

from edge.web import CONTENT_SECURITY_POLICY
from tests.console.conftest import TECH, TECH_PASSWORD, console_node
from tests.console.helpers import ConsoleClient
from tests.kiosk.node import KioskNode, issue, seed_study

REPO = Path(__file__).resolve().parents[2]
HOSTILE = "<script>alert(\"x'\")</script>"
HOSTILE_ESCAPED = "&lt;script&gt;alert(&quot;x&#x27;&quot;)&lt;/script&gt;"
SECURITY = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _assert_shown_as_text(html: str, escaped: str) -> None:
    assert escaped in html
    assert "<script>" not in html.lower() and "alert(\"x'\")" not in html


def test_a_script_in_name_accession_and_exam_reaches_the_today_page_as_text(node_factory: Any) -> None:
    exam = 'Knee "X-ray" <b>'
    node = console_node(node_factory, console={"exams": [exam]})
    client = ConsoleClient(node)
    assert client.login(TECH, TECH_PASSWORD) == 303
    order_id = client.register(surname="Dlamini", given_names=HOSTILE, exam=exam, id_number="8001015009087")
    accession = "<i>'A\"1"  # as an order imported from elsewhere might hold it
    with sqlite3.connect(node.data_dir / "edge.db", timeout=15) as db:
        assert db.execute('UPDATE "order" SET accession_number = ? WHERE id = ?', (accession, order_id)).rowcount == 1

    status, html, headers = client.request("GET", "/")
    assert status == 200
    _assert_shown_as_text(html, f"<strong>DLAMINI, {HOSTILE_ESCAPED}</strong>")
    assert "<td>Knee &quot;X-ray&quot; &lt;b&gt;<br>" in html and "<b>" not in html
    assert '<small class="acc">&lt;i&gt;&#x27;A&quot;1</small>' in html and "<i>" not in html
    assert {name: headers.get(name) for name in SECURITY} == SECURITY

    # The row the open page swaps in when the visit changes is the same escaped text.
    status, body, _ = client.request("GET", f"/api/rows?ids={order_id}")
    row = json.loads(body)[str(order_id)]["html"]
    assert status == 200 and row.startswith(f'<tr data-order="{order_id}"')
    assert "&lt;script&gt;" in row and "<script>" not in row and "&lt;i&gt;&#x27;A&quot;1" in row


async def _report_page(url: str, code: str, pin: str) -> tuple[str, dict[str, str]]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.get(url + "/") as answer:
            start_headers = dict(answer.headers)
        await http.post(url + "/language", data={"lang": "zu"})
        await http.post(url + "/code", data={"code": code})
        async with http.post(url + "/pin", data={"pin": pin}) as answer:
            assert answer.url.path == "/report"
            return await answer.text(), start_headers


def test_a_script_in_name_exam_and_report_reaches_the_kiosk_report_screen_as_text(tmp_path: Path) -> None:
    node = KioskNode(tmp_path / "kiosk")
    seed_study(node.data_dir, "ACC-S1", report_text=f"Findings: {HOSTILE}\nHeart normal.")
    ticket = issue(node.data_dir, "ACC-S1", f"Thandi {HOSTILE}", f"Chest {HOSTILE}")
    node.start()
    try:
        html, headers = asyncio.run(_report_page(node.url, ticket.code, ticket.pin))
    finally:
        node.stop()
    _assert_shown_as_text(html, HOSTILE_ESCAPED)
    assert f"<dd>Thandi {HOSTILE_ESCAPED}</dd>" in html
    assert f"<dd>Chest {HOSTILE_ESCAPED}</dd>" in html
    # the heading in the patient's language (kiosk.patient_texts.report_headings), the reader's words escaped
    assert f'<div class="report">Okutholakele: {HOSTILE_ESCAPED}\nHeart normal.</div>' in html
    assert '<html lang="zu">' in html and "<dt>Isiguli</dt>" in html  # the catalog's words still flow through
    assert {name: headers.get(name) for name in SECURITY} == SECURITY


def _html_f_strings(path: Path) -> list[str]:
    """Every f-string in ``path`` whose literal text holds a tag: HTML built by hand."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.JoinedStr):
            text = "".join(part.value for part in node.values
                           if isinstance(part, ast.Constant) and isinstance(part.value, str))
            if re.search(r"<[a-zA-Z/!]", text):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_no_console_or_kiosk_module_builds_html_from_f_strings() -> None:
    # kiosk/page_text.py makes ReportLab's markup, with its own escaping (test_hostile_values checks it);
    # kiosk/cloud_film runs inside the cloud's Orthanc, whose Python has the standard library only.
    allowed = {REPO / "kiosk" / "page_text.py"}
    modules = [p for package in ("edge/console", "kiosk") for p in sorted((REPO / package).rglob("*.py"))
               if p not in allowed and "cloud_film" not in p.parts]
    assert len(modules) > 20
    assert [hit for module in modules for hit in _html_f_strings(module)] == []
