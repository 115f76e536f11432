"""The clinic's own words that reach a patient — where to collect the report, the exam's name —
in the patient's language.

The built-in ones ("the patient kiosk at reception", "Chest X-ray", "ECG") are catalog
messages like every other word; the clinic's ones come from edge.toml (``[kiosk] collect_at``,
``[console] exams``), each a plain English text or one per language
(:mod:`edge.config.patient_text`). A ticket stores the exam's English name (what the
technician picked and the worklist carries); the kiosk turns it into the patient's words here.

The reader's report stays as written, but its headings are the SR's coded concept names
(``sync.reports.sr_text``), which the node renders: :func:`report_headings` shows the common
ones in the patient's language on the screen, the A4 page and the receipt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edge.config.patient_text import english, in_language
from kiosk.i18n import SOURCE_LANGUAGE, Catalog, load_catalog

if TYPE_CHECKING:  # the whole config is the roof's; a part only reads it
    from edge.node.config import EdgeConfig

# Exams every node offers (edge.orders.const): English name → catalog key.
BUILT_IN_EXAMS: Mapping[str, str] = {"Chest X-ray": "exam_chest_xray", "ECG": "exam_ecg"}

# SR concept names (CodeMeaning, case-folded) the kiosk words in the patient's language → catalog key.
# A plural with no key of its own reads as the singular: closer than English for the patient.
REPORT_HEADINGS: Mapping[str, str] = {
    "diagnostic imaging report": "sr_title",
    "finding": "sr_finding", "findings": "sr_findings",
    "impression": "sr_impression", "impressions": "sr_impression",
    "recommendation": "sr_recommendation", "recommendations": "sr_recommendation",
    "conclusion": "sr_conclusion", "conclusions": "sr_conclusion",
    "history": "sr_history", "clinical history": "sr_clinical_history", "clinical information": "sr_clinical_history",
    "indication": "sr_indication", "indications": "sr_indication", "indications for procedure": "sr_indication",
    "comparison": "sr_comparison", "comparisons": "sr_comparison",
    "procedure": "sr_procedure", "procedure description": "sr_procedure",
}


def report_headings(text: str, t: Catalog) -> str:
    """The SR text with each line's leading heading in ``t``'s language, everything else as stored.

    A heading is a whole line (the title, a container) or the part of a line before its first
    colon, as ``sr_text`` writes them; only names in :data:`REPORT_HEADINGS` change, so a
    heading nobody translated, and every word after the colon, reach the patient as the reader
    wrote them. English is left untouched (the reader's own spelling). Returns plain text:
    the screen and the paper escape it as they escape every value.
    """
    if t.language == SOURCE_LANGUAGE:
        return text
    return "\n".join(_heading_line(line, t) for line in text.split("\n"))


def _heading_line(line: str, t: Catalog) -> str:
    body = line.lstrip(" ")
    indent = line[:len(line) - len(body)]
    head, colon, rest = body.partition(":")
    key = REPORT_HEADINGS.get(" ".join(head.split()).casefold())
    if key is None:
        return line
    return f"{indent}{t(key)}{colon}{rest}"


@dataclass(frozen=True)
class PatientTexts:
    """What the clinic configured, resolved per language on demand."""

    collect_at: str | dict[str, str] = ""
    exams: Mapping[str, str | dict[str, str]] = field(default_factory=dict)  # English name → the configured value

    @classmethod
    def from_config(cls, config: EdgeConfig) -> PatientTexts:
        return cls.of(config.kiosk.collect_at, config.console.exams)

    @classmethod
    def of(cls, collect_at: str | dict[str, str], exams: Sequence[str | dict[str, str]] = ()) -> PatientTexts:
        return cls(collect_at, {english(value): value for value in exams})

    def collect_place(self, language: str) -> str:
        """Where the slip says to collect the report, in ``language``."""
        if not self.collect_at:
            return load_catalog(language)("collect_at_default")
        return in_language(self.collect_at, language) or english(self.collect_at)

    def exam(self, name: str, language: str) -> str:
        """The exam ``name`` (English, from the ticket) as the patient reads it; an exam nobody
        translated stays as it was typed (``edge kiosk catalog-check`` lists those)."""
        configured = self.exams.get(name)
        if configured is not None:
            found = in_language(configured, language)
            if found:
                return found
        key = BUILT_IN_EXAMS.get(name)
        if key is not None:
            return load_catalog(language)(key)
        return name

    def untranslated(self, languages: Sequence[str]) -> list[str]:
        """``"[kiosk] collect_at: zu, xh"``-style lines for each configured text missing a kiosk language."""
        lines: list[str] = []
        if self.collect_at:
            missing = [lang for lang in languages if not in_language(self.collect_at, lang)]
            if missing:
                lines.append(f"[kiosk] collect_at: no text for {', '.join(missing)} (they read the English)")
        for name, value in self.exams.items():
            if name in BUILT_IN_EXAMS:
                continue
            missing = [lang for lang in languages if not in_language(value, lang)]
            if missing:
                lines.append(f"[console] exams {name!r}: no name for {', '.join(missing)} (they read the English)")
        return lines
