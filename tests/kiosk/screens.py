"""Every kiosk screen, reached the way a patient reaches it, for the language and ergonomics tests.

:func:`walk` drives one browser page through the language choice, slip code (right and
wrong), PIN (right and wrong), the report (SR and PDF, details shown and hidden), the
printed confirmation, "not ready yet" and a locked code, yielding each screen's name while
it is showing, so a test can measure or read it there.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.kiosk.helpers import choose_language, keypad, scan
from tests.kiosk.node import KioskNode, issue, seed_study

SHOTS = Path("/tmp/shots16k")  # the screenshots, for a person to look at after the run
REPORT = "Diagnostic imaging report\n  Finding: No acute cardiopulmonary findings.\n  Impression: Normal chest."
KNEE = {"en": "Knee X-ray", "zu": "I-X-ray yedolo", "xh": "I-X-ray yedolo", "st": "X-ray ya lengole",
        "af": "Knie-X-straal"}


def wrong_pin(pin: str) -> str:
    return "".join(str((int(d) + 1) % 10) for d in pin)


def toml_value(value: Any) -> str:
    """A TOML literal for a string, list or one-level table (tests/node.write_config writes JSON scalars)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def set_key(config: Path, section: str, key: str, value: Any) -> None:
    """Add ``key = value`` under ``[section]`` of a test node's edge.toml."""
    text = config.read_text()
    header = f"[{section}]\n"
    assert header in text, section
    config.write_text(text.replace(header, f"{header}{key} = {toml_value(value)}\n", 1))


def screen_node(factory: Any, cups_server: str, **kiosk: Any) -> KioskNode:
    """A kiosk that prints to the test CUPS, generous with prints and failed tries (the walk makes many)."""
    settings: dict[str, Any] = {"cups_server": cups_server, "print_limit": 50, "max_pin_failures": 2,
                                "throttle_after_failures": 500, "throttle_node_failures": 1000, **kiosk}
    node: KioskNode = factory(**settings)
    set_key(node.config, "console", "exams", [KNEE])
    return node


@dataclass(frozen=True)
class Slips:
    ready: Any  # an SR report, Chest X-ray
    pdf: Any  # a reader's PDF, the clinic's own exam (per language in [console] exams)
    waiting: Any  # images taken, no report yet
    lock: Any  # gets locked by wrong PINs


def slips(node: KioskNode, tag: str, name: str = "Thandiwe Nkosi") -> Slips:
    """Fresh slips for one walk (a walk prints once and locks one code)."""
    seed_study(node.data_dir, f"R{tag}", report_text=REPORT)
    seed_study(node.data_dir, f"P{tag}", pdf=reader_pdf())
    seed_study(node.data_dir, f"W{tag}")
    seed_study(node.data_dir, f"L{tag}", report_text=REPORT)
    return Slips(issue(node.data_dir, f"R{tag}", name, "Chest X-ray"),
                 issue(node.data_dir, f"P{tag}", name, "Knee X-ray"),
                 issue(node.data_dir, f"W{tag}", name, "ECG"),
                 issue(node.data_dir, f"L{tag}", name))


def reader_pdf() -> bytes:
    """A reader's one-page PDF report (the words on it are the doctor's, not the kiosk's)."""
    import io

    from reportlab.pdfgen.canvas import Canvas

    buffer = io.BytesIO()
    c = Canvas(buffer)
    c.drawString(72, 720, "Knee: no fracture.")
    c.showPage()
    c.save()
    return buffer.getvalue()


def _enter(page: Any, lang: str, slip: Any, pin: str | None = None) -> None:
    choose_language(page, lang)
    scan(page, slip.code)
    keypad(page, slip.pin if pin is None else pin)


def walk(page: Any, node: KioskNode, lang: str, s: Slips) -> Iterator[str]:
    """Show each screen in ``lang`` in turn, yielding its name while it is showing."""
    page.goto(node.url + "/")
    yield "language"
    choose_language(page, lang)
    yield "code"
    keypad(page, "12")  # too short: "that number is not right"
    yield "code-wrong"
    scan(page, s.ready.code)
    yield "pin"
    keypad(page, wrong_pin(s.ready.pin))
    yield "pin-wrong"
    keypad(page, s.ready.pin)
    page.wait_for_selector("body[data-page=report]")
    yield "report"
    page.click("#hide")
    yield "report-hidden"
    page.click("#hide")
    page.click("#print")
    page.wait_for_selector("body[data-page=printed]", timeout=30_000)
    yield "printed"
    page.click("#finish")
    _enter(page, lang, s.pdf)
    page.wait_for_selector("body[data-page=report]")
    yield "report-pdf"
    page.click("#start-again")
    _enter(page, lang, s.waiting)
    page.wait_for_selector("body[data-page=not-ready]")
    yield "not-ready"
    page.click("#finish")
    _enter(page, lang, s.lock, wrong_pin(s.lock.pin))
    keypad(page, wrong_pin(s.lock.pin))
    page.wait_for_selector("body[data-page=message]")
    yield "locked"


def save_shot(page: Any, where: Path, name: str) -> Path:
    """A screenshot into the test's folder and a copy into /tmp/shots16k/."""
    path = where / f"{name}.png"
    page.screenshot(path=str(path))
    SHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SHOTS / path.name)
    return path


# Every word a patient can read, hidden or not (the countdown is hidden until it counts), one text
# node per line; the report body (the doctor's own English) is left out, as are scripts and styles.
VISIBLE_WORDS_JS = """(root) => {
  const skip = (el) => el.closest('script, style, .report');
  const out = [];
  const walker = document.createTreeWalker(root || document.documentElement, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    const el = walker.currentNode.parentElement;
    if (el && !skip(el) && walker.currentNode.nodeValue.trim()) out.push(walker.currentNode.nodeValue.trim());
  }
  (root || document).querySelectorAll('[aria-label], [title], [placeholder]').forEach((el) => {
    ['aria-label', 'title', 'placeholder'].forEach((a) => { if (el.getAttribute(a)) out.push(el.getAttribute(a)); });
  });
  return out.join('\\n');
}"""


def page_words(page: Any) -> str:
    return str(page.evaluate(VISIBLE_WORDS_JS, None))


def words_by_language(page: Any) -> dict[str, str]:
    """The first screen: each ``lang``-marked element's words, and "" for the words marked with none."""
    found: dict[str, str] = page.evaluate("""() => {
      const out = {};
      document.querySelectorAll('body [lang]').forEach((el) => {
        out[el.lang] = (out[el.lang] || '') + '\\n' + el.innerText;
      });
      const copy = document.body.cloneNode(true);
      copy.querySelectorAll('[lang], script').forEach((el) => el.remove());
      out[''] = copy.innerText;
      return out;
    }""")
    return found


def squash(text: str) -> str:
    return re.sub(r"\s+", " ", text)
