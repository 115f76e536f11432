"""The patient's phone page: server-rendered HTML, no JavaScript, every DICOM value escaped.

Pure functions over the JSON Orthanc returns (``simplified-tags``), so they run and are
tested without Orthanc; ``film_plugin`` is the glue. Sized for a 360-400 px wide screen
and an old, small Android browser: one column, plain <img> in a link to the full-size
image (the phone's own pinch-zoom), system fonts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape
from typing import Any

REFUSED_TEXT = "This link is not valid or has expired \u2014 please ask the clinic"
SR_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.",)  # every Structured Report storage class
PDF_CLASS = "1.2.840.10008.5.1.4.1.1.104.1"
NOT_IMAGES = frozenset({"SR", "DOC", "KO", "PR", "ECG"})  # series modalities with nothing to look at as a picture
MAX_SR_ITEMS = 2000  # a report tree bigger or deeper than this is cut, with a note: the page stays small
MAX_SR_DEPTH = 12
MAX_SR_CHARS = 100_000

_STYLE = """
body{margin:0;padding:12px;font-family:sans-serif;font-size:17px;line-height:1.4;color:#111;background:#fff;max-width:760px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:19px;margin:20px 0 6px}h3{font-size:17px;margin:12px 0 4px}
.who{color:#444;margin:0 0 12px}.img{margin:0 0 14px}.img img{display:block;width:100%;height:auto;background:#000}
.hint{font-size:14px;color:#555;margin:4px 0 0}.status{font-weight:bold}.final{color:#0a5d1a}.none{color:#8a4b00}
.report p{margin:0 0 6px}.report .item{margin-left:12px}a.pdf{display:inline-block;padding:12px 16px;border:2px solid #0a4a8a;
color:#0a4a8a;text-decoration:none;font-weight:bold;border-radius:6px}
""".replace("\n", "")


@dataclass(frozen=True)
class Report:
    """The study's current verified report: SR text lines (depth, text) or a PDF to open."""

    kind: str  # "sr" | "pdf"
    sop_instance_uid: str
    verified_by: str = ""
    verified_at: str = ""  # DICOM DT, as written
    lines: tuple[tuple[int, str], ...] = ()
    cut: bool = False


@dataclass(frozen=True)
class StudyView:
    exam: str
    study_date: str
    patient_name: str
    images: int
    report: Report | None
    notes: list[str] = field(default_factory=list)


def _page(title: str, body: str) -> str:
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<meta name=\"robots\" content=\"noindex\"><meta name=\"referrer\" content=\"no-referrer\">"
            f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>{body}</body></html>")


def refused_page() -> str:
    """The one page every refused link gets: nothing about the study, the node or why."""
    return _page("Link not valid", f"<p>{escape(REFUSED_TEXT)}</p>")


def readable_date(value: str) -> str:
    digits = "".join(c for c in value if c.isdigit())
    return f"{digits[0:4]}-{digits[4:6]}-{digits[6:8]}" if len(digits) >= 8 else value


def readable_datetime(value: str) -> str:
    digits = "".join(c for c in value.split("+")[0].split("-")[0] if c.isdigit() or c == ".").split(".")[0]
    if len(digits) >= 12:
        return f"{readable_date(digits)} {digits[8:10]}:{digits[10:12]}"
    return readable_date(digits) if digits else value


def person_name(value: Any) -> str:
    """DICOM PN ``Family^Given^Middle^Prefix^Suffix`` as a person reads it."""
    text = str(value or "").split("=")[0]
    parts = text.split("^") + [""] * 5
    family, given, middle, prefix, suffix = (p.strip() for p in parts[:5])
    return " ".join(p for p in (prefix, given, middle, family, suffix) if p)


def study_page(view: StudyView, token: str) -> str:
    """The study's images (each a link to its full size) and its current verified report."""
    out = [f"<h1>{escape(view.exam or 'Your imaging study')}</h1>",
           (f"<p class=\"who\">{escape(view.patient_name)}{' &middot; ' if view.patient_name else ''}"
            f"{escape(readable_date(view.study_date))}</p>")]
    base = escape(token, quote=True)  # relative links: /film/<token>/… wherever the gateway mounts the plugin
    if view.images:
        for n in range(view.images):
            out.append(f"<div class=\"img\"><a href=\"{base}/image/{n}?size=full\"><img src=\"{base}/image/{n}\" "
                       f"alt=\"Image {n + 1} of {view.images}\"></a></div>")
        out.append("<p class=\"hint\">Tap an image to open it full size, then pinch to zoom.</p>")
    else:
        out.append("<p>No images are available for this study.</p>")
    out.append("<div class=\"report\"><h2>Report</h2>")
    report = view.report
    if report is None:
        out.append("<p class=\"status none\">The doctor's report is not ready yet. Please check again later.</p>")
    else:
        who = f" by {escape(report.verified_by)}" if report.verified_by else ""
        when = f" on {escape(readable_datetime(report.verified_at))}" if report.verified_at else ""
        out.append(f"<p class=\"status final\">Final report, verified{who}{when}</p>")
        if report.kind == "pdf":
            out.append(f"<p><a class=\"pdf\" href=\"{base}/report.pdf\">Open the report (PDF)</a></p>")
        for depth, text in report.lines:
            tag = "h3" if depth < 0 else "p"
            indent = f" class=\"item\" style=\"margin-left:{min(abs(depth), 6) * 12}px\"" if abs(depth) > 1 else ""
            out.append(f"<{tag}{indent}>{escape(text)}</{tag}>")
        if report.cut:
            out.append("<p><em>The report is longer than this page shows; please ask the clinic for the full "
                       "report.</em></p>")
    out.append("</div>")
    return _page(view.exam or "Your imaging study", "".join(out))


# ------------------------------------------------------------------ reports


def _first(value: Any) -> dict[str, Any]:
    return value[0] if isinstance(value, list) and value and isinstance(value[0], dict) else {}


def _text(value: Any) -> str:
    return str(value) if isinstance(value, (str, int, float)) else ""


def _item_value(item: dict[str, Any]) -> str:
    kind = _text(item.get("ValueType"))
    if kind == "TEXT":
        return _text(item.get("TextValue"))
    if kind == "CODE":
        return _text(_first(item.get("ConceptCodeSequence")).get("CodeMeaning"))
    if kind == "NUM":
        measured = _first(item.get("MeasuredValueSequence"))
        unit = _text(_first(measured.get("MeasurementUnitsCodeSequence")).get("CodeValue"))
        return f"{_text(measured.get('NumericValue'))} {unit if unit != '1' else ''}".strip()
    if kind == "PNAME":
        return person_name(item.get("PersonName"))
    if kind in ("DATE", "DATETIME"):
        return readable_datetime(_text(item.get(kind.title().replace("time", "Time"))))
    if kind == "TIME":
        return _text(item.get("Time"))
    if kind == "UIDREF":
        return ""
    return ""


def sr_lines(tags: dict[str, Any]) -> tuple[tuple[tuple[int, str], ...], bool]:
    """The SR content tree as (depth, text) lines; containers are headings (negative depth).

    Bounded in items, depth and characters, and tolerant of anything malformed: a
    hostile or broken tree gives a shorter page, never an error.
    """
    lines: list[tuple[int, str]] = []
    chars = 0
    cut = False
    stack: list[tuple[int, Any]] = [(1, item) for item in reversed(_items(tags.get("ContentSequence")))]
    while stack:
        depth, item = stack.pop()
        if len(lines) >= MAX_SR_ITEMS or chars >= MAX_SR_CHARS or depth > MAX_SR_DEPTH:
            cut = True
            if depth > MAX_SR_DEPTH:
                continue
            break
        if not isinstance(item, dict):
            continue
        name = _text(_first(item.get("ConceptNameCodeSequence")).get("CodeMeaning"))
        if _text(item.get("ValueType")) == "CONTAINER":
            if name and depth > 1:
                lines.append((-depth, name))
        else:
            value = _item_value(item)
            if value:
                text = f"{name}: {value}" if name and name.lower() not in ("finding", "findings", "text") else value
                lines.append((depth, text[: MAX_SR_CHARS - chars]))
                chars += len(text)
        stack.extend((depth + 1, child) for child in reversed(_items(item.get("ContentSequence"))))
    return tuple(lines), cut


def _items(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def verification(tags: dict[str, Any]) -> tuple[str, str]:
    """(who verified, when: DICOM DT) from the newest VerifyingObserverSequence item."""
    observers = [o for o in _items(tags.get("VerifyingObserverSequence")) if isinstance(o, dict)]
    if not observers:
        return "", ""
    newest = max(observers, key=lambda o: _text(o.get("VerificationDateTime")))
    return person_name(newest.get("VerifyingObserverName")), _text(newest.get("VerificationDateTime"))


def is_final(tags: dict[str, Any]) -> bool:
    """Shown to the patient: an SR verified and complete, or an encapsulated PDF (a reader's signed document)."""
    sop_class = _text(tags.get("SOPClassUID"))
    if sop_class == PDF_CLASS:
        return _text(tags.get("MIMETypeOfEncapsulatedDocument")).lower() in ("", "application/pdf")
    if sop_class.startswith(SR_CLASSES):
        return tags.get("VerificationFlag") == "VERIFIED" and tags.get("CompletionFlag") == "COMPLETE"
    return False


def _predecessors(tags: dict[str, Any]) -> set[str]:
    found = set()
    for study in _items(tags.get("PredecessorDocumentsSequence")):
        for series in _items(study.get("ReferencedSeriesSequence") if isinstance(study, dict) else None):
            for ref in _items(series.get("ReferencedSOPSequence") if isinstance(series, dict) else None):
                if isinstance(ref, dict):
                    found.add(_text(ref.get("ReferencedSOPInstanceUID")))
    return found


def current_report(candidates: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The newest final report: superseded ones (named as a predecessor) out, then the latest verification/content time."""
    finals = [t for t in candidates if is_final(t)]
    replaced = set().union(*(_predecessors(t) for t in finals)) if finals else set()
    current = [t for t in finals if _text(t.get("SOPInstanceUID")) not in replaced]

    def when(tags: dict[str, Any]) -> str:
        verified = verification(tags)[1]
        content = _text(tags.get("ContentDate")) + _text(tags.get("ContentTime"))
        return max(verified, content)

    return max(current, key=when) if current else None


def report_of(tags: dict[str, Any]) -> Report:
    who, when = verification(tags)
    uid = _text(tags.get("SOPInstanceUID"))
    if _text(tags.get("SOPClassUID")) == PDF_CLASS:
        return Report("pdf", uid, who, when or _text(tags.get("ContentDate")) + _text(tags.get("ContentTime")))
    lines, cut = sr_lines(tags)
    return Report("sr", uid, who, when, lines, cut)
