"""The kiosk as a hand and an eye meet it, measured in real headless Chromium (issue 16, item 8).

On a portrait 1080 x 1920 and a landscape 1280 x 800 screen, in English and isiZulu, every
screen: each button, link and field at least 96 x 96 px; the main action on screen without
scrolling; no band of empty screen a third of its height or more; nothing wider than the
screen. The idle reset counts down first ("touch the screen to stay"); the report's details
hide with one touch, with or without script; the printed confirmation does not say one
sentence twice. Screenshots of each go to the test's folder and /tmp/shots16k/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kiosk.i18n import load_catalog
from tests.kiosk.cups_peer import CupsPeer
from tests.kiosk.helpers import choose_language, keypad, main_text, scan
from tests.kiosk.screens import save_shot, screen_node, slips, squash, walk

SCREENS = {"portrait": {"width": 1080, "height": 1920}, "landscape": {"width": 1280, "height": 800}}
MIN_TARGET = 96
PRIMARY = {  # the action each screen is for: it must be on screen without scrolling
    "language": "button[name=lang]", "code": ".keypad button.ok", "code-wrong": ".keypad button.ok",
    "pin": ".keypad button.ok", "pin-wrong": ".keypad button.ok", "report": "#print", "report-hidden": "#print",
    "report-pdf": "#print", "printed": "#finish", "not-ready": "#finish", "locked": "#finish",
}

# Every visible thing a finger can press: its box, and a name for the message when it is too small.
TARGETS_JS = """() => Array.from(document.querySelectorAll(
    'button, a[href], label.btn, input:not([type=checkbox]), select, textarea, [role=button]'))
  .filter((el) => { const r = el.getBoundingClientRect(); return r.width > 0 && r.height > 0; })
  .map((el) => { const r = el.getBoundingClientRect();
                 return {name: el.id || el.dataset.key || el.getAttribute('aria-label') || el.innerText.trim().slice(0, 30)
                               || el.tagName, w: r.width, h: r.height, top: r.top, bottom: r.bottom,
                         inMain: el.closest('main') !== null}; })"""

# The largest horizontal band of <main> that no visible content (text, field, button, picture) covers.
EMPTY_BAND_JS = """() => {
  const main = document.querySelector('main').getBoundingClientRect();
  const boxes = [];
  document.querySelectorAll('main *').forEach((el) => {
    const leaf = el.matches('button, a, input, label, svg, dt, dd, h1, h2, p, .report, .notice')
                 || (el.children.length === 0 && el.innerText && el.innerText.trim());
    if (!leaf || el.closest('svg') !== null && el.tagName !== 'svg') return;
    const r = el.getBoundingClientRect();
    if (r.width > 0 && r.height > 0) boxes.push([Math.max(r.top, main.top), Math.min(r.bottom, main.bottom)]);
  });
  boxes.sort((a, b) => a[0] - b[0]);
  let reach = main.top, band = 0;
  for (const [top, bottom] of boxes) { band = Math.max(band, top - reach); reach = Math.max(reach, bottom); }
  band = Math.max(band, main.bottom - reach);
  return {band: band, main: main.height, wide: document.documentElement.scrollWidth > window.innerWidth};
}"""


def check_screen(page: Any, screen: str, size: dict[str, int]) -> list[str]:
    """Everything wrong with the screen showing now, as readable lines (empty when all is well)."""
    problems = []
    main = page.locator("main").bounding_box()  # main scrolls: what lies below its edge is not on screen
    assert main is not None
    for t in page.evaluate(TARGETS_JS):
        if t["w"] < MIN_TARGET or t["h"] < MIN_TARGET:
            problems.append(f"{screen}: {t['name']!r} is {t['w']:.0f} x {t['h']:.0f} px")
        if t["inMain"] and (t["top"] < main["y"] - 0.5 or t["bottom"] > main["y"] + main["height"] + 0.5):
            problems.append(f"{screen}: {t['name']!r} needs scrolling to reach")
    primary = page.locator(PRIMARY[screen]).first.bounding_box()
    if primary is None or primary["y"] + primary["height"] > main["y"] + main["height"] or primary["y"] < main["y"]:
        problems.append(f"{screen}: {PRIMARY[screen]} is not on screen without scrolling ({primary})")
    fill = page.evaluate(EMPTY_BAND_JS)
    if fill["band"] >= size["height"] / 3:
        problems.append(f"{screen}: an empty band of {fill['band']:.0f} px of {size['height']} px")
    if fill["wide"]:
        problems.append(f"{screen}: wider than the screen")
    return problems


@pytest.mark.parametrize("orientation", sorted(SCREENS))
def test_every_screen_has_big_targets_and_fills_the_screen_in_english_and_isizulu(
    browser: Any, cups: CupsPeer, kiosk_factory: Any, tmp_path: Path, orientation: str
) -> None:
    size = SCREENS[orientation]
    node = screen_node(kiosk_factory, cups.server, idle_timeout_s=600)
    walks = {lang: slips(node, f"{orientation[0]}{lang}") for lang in ("en", "zu")}
    node.start()
    problems: list[str] = []
    seen = []
    for lang, s in walks.items():
        context = browser.new_context(viewport=size)
        page = context.new_page()
        for screen in walk(page, node, lang, s):
            seen.append(screen)
            save_shot(page, tmp_path, f"{size['width']}x{size['height']}-{lang}-{screen}")
            problems += [f"{lang} {p}" for p in check_screen(page, screen, size)]
            if screen == "printed":  # the heading and the notice say different things
                heading, notice = page.inner_text("main h1"), page.inner_text("main .notice")
                t = load_catalog(lang)
                assert squash(heading) == t("printed_title") and squash(notice) == t("printed"), (heading, notice)
        context.close()
    assert set(seen) == set(PRIMARY)
    assert not problems, "\n".join(problems)


def test_the_idle_reset_counts_down_first_and_a_touch_keeps_the_screen(
    browser: Any, cups: CupsPeer, kiosk_factory: Any, tmp_path: Path
) -> None:
    node = screen_node(kiosk_factory, cups.server, idle_timeout_s=12, idle_warning_s=6)
    s = slips(node, "idle")
    node.start()
    page = browser.new_context(viewport=SCREENS["portrait"]).new_page()
    page.goto(node.url + "/")
    choose_language(page, "zu")
    scan(page, s.ready.code)
    keypad(page, s.ready.pin)
    page.wait_for_selector("body[data-page=report]")
    assert page.is_hidden("#idle-warning")  # 12 s of quiet before the reset, the last 6 counted down

    page.wait_for_selector("#idle-warning", state="visible", timeout=30_000)
    t = load_catalog("zu")
    words = squash(page.inner_text("#idle-warning"))
    assert t("idle_warning") in words and t("stay") in words
    left = int(page.inner_text("#idle-seconds"))
    assert 1 <= left <= 6
    assert "Sipho" not in words and "Thandiwe Nkosi" in main_text(page)  # still the report underneath
    stay = page.locator("#stay").bounding_box()
    assert stay is not None and stay["width"] >= MIN_TARGET and stay["height"] >= MIN_TARGET
    save_shot(page, tmp_path, "1080x1920-zu-idle-countdown")

    page.click("#stay")  # "I am still here": the countdown goes, the report stays
    page.wait_for_selector("#idle-warning", state="hidden")
    assert page.get_attribute("body", "data-page") == "report"

    page.wait_for_selector("#idle-warning", state="visible", timeout=30_000)  # quiet again: it counts again …
    page.wait_for_selector("body[data-page=language]", timeout=30_000)  # … and then goes back to the start
    assert "Thandiwe" not in main_text(page)
    page.context.close()


@pytest.mark.parametrize("orientation", sorted(SCREENS))
@pytest.mark.parametrize("script", [True, False], ids=["with-script", "without-script"])
def test_hide_my_details_takes_the_name_and_the_report_off_the_screen(
    browser: Any, cups: CupsPeer, kiosk_factory: Any, tmp_path: Path, script: bool, orientation: str
) -> None:
    node = screen_node(kiosk_factory, cups.server, idle_timeout_s=600)
    s = slips(node, "hide", name="Lindiwe Mabaso")
    node.start()
    size = SCREENS[orientation]
    page = browser.new_context(viewport=size, java_script_enabled=script).new_page()
    page.goto(node.url + "/")
    choose_language(page, "en")
    scan(page, s.ready.code)
    if script:
        keypad(page, s.ready.pin)
    else:  # no keypad without script: the field takes the digits, Enter sends them
        page.fill("#pin", s.ready.pin)
        with page.expect_navigation():
            page.press("#pin", "Enter")
    assert "Lindiwe Mabaso" in main_text(page) and "No acute cardiopulmonary findings" in main_text(page)

    page.click("#hide")
    text = main_text(page)
    assert "Lindiwe" not in text and "cardiopulmonary" not in text and "Chest X-ray" not in text
    assert "Your details are hidden" in text and "Show my details" in text
    assert page.is_visible("#print")  # hidden from the room, still printable
    save_shot(page, tmp_path, f"{size['width']}x{size['height']}-en-report-hidden-{'js' if script else 'nojs'}")

    page.click("#hide")
    assert "Lindiwe Mabaso" in main_text(page) and "Hide my details" in main_text(page)
    page.context.close()
