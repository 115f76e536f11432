"""What a kiosk test checks from outside: the screens in Chromium, the printed PDF's QR, the audit log."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from tests.kiosk.node import KioskNode


def open_kiosk(browser: Any, node: KioskNode) -> tuple[Any, list[str]]:
    """A fresh browser context (a kiosk screen) and the list of every URL it requests."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    page.goto(node.url + "/")
    return page, urls


def choose_language(page: Any, lang: str) -> None:
    page.click(f"button[name=lang][value={lang}]")
    page.wait_for_selector("input#code")


def scan(page: Any, code: str) -> None:
    """As the USB scanner does: the digits typed quickly, then Enter.

    Only once the field has the focus (the page gives it on load: a scanner types into
    whatever has it), and until the answer page has loaded: on a busy machine Enter's
    navigation may not have begun when wait_for_load_state would look.
    """
    page.wait_for_function("document.activeElement && document.activeElement.id === 'code'")
    page.keyboard.type(code, delay=5)
    with page.expect_navigation():
        page.keyboard.press("Enter")


def keypad(page: Any, digits: str) -> None:
    """Touch the on-screen keypad, then its OK key."""
    for d in digits:
        page.click(f".keypad button[data-key='{d}']")
    with page.expect_navigation():  # the answer page, not the one still showing
        page.click(".keypad button.ok")


def main_text(page: Any) -> str:
    return str(page.inner_text("body"))


def shot(page: Any, where: Path, name: str) -> Path:
    path = where / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def qr_urls_in_pdf(pdf: Path, where: Path) -> list[str]:
    """Render the PDF with pdftoppm and decode every QR code on it with zbarimg."""
    prefix = where / pdf.stem
    subprocess.run(["pdftoppm", "-r", "150", "-png", str(pdf), str(prefix)], check=True, timeout=60)
    found: list[str] = []
    for png in sorted(where.glob(f"{pdf.stem}*.png")):
        done = subprocess.run(["zbarimg", "--raw", "-q", "-Sdisable", "-Sqrcode.enable", str(png)],
                              capture_output=True, text=True, timeout=60)
        found += [line for line in done.stdout.splitlines() if line.strip()]
    return found


def token_of(url: str) -> tuple[str, str]:
    """(the study the token names, token) from a film URL made from the default template (.../film/{token})."""
    from kiosk.cloud_film.film_token import read_claims

    token = urlsplit(url).path.rsplit("/", 1)[-1]
    return read_claims(token)[0].study_uid, token


def node_key(node: KioskNode) -> Ed25519PublicKey:
    """The node's film-link public key, as the cloud holds it."""
    from kiosk.viewer_token import load_or_create_key

    return load_or_create_key(node.data_dir, create=False).public_key()


def audit(node: KioskNode) -> list[dict[str, Any]]:
    return list(json.loads(node.cli("kiosk", "audit", "--json", "--limit", "500").stdout))


def escpos_qr_payloads(data: bytes) -> list[str]:
    """The data of every native QR "store" command (GS ( k … 1 P 0) in an ESC/POS stream."""
    found = []
    for match in re.finditer(rb"\x1d\(k(..)1P0", data, re.DOTALL):
        length = match.group(1)[0] + 256 * match.group(1)[1] - 3
        start = match.end()
        found.append(data[start:start + length].decode("ascii"))
    return found
