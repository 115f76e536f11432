"""Text on paper: the one way a value reaches a printed page, escaped by default.

Values on the report page come from DICOM headers, the cloud's report and the clinic's
config; any of them can hold ``<b>``, ``</para>`` or ``<img src="/etc/hostname"/>``,
which ReportLab's Paragraph reads as markup (a failed print, or a local file opened), or
an ESC byte, which a receipt printer reads as a command. Escaping was once a call each
field had to remember, and one forgot; so every Paragraph in the kiosk is made here
(a test checks no other module builds one), and every receipt line goes through
:func:`plain`.
"""

from __future__ import annotations

import unicodedata
from xml.sax.saxutils import escape

from reportlab.lib.styles import ParagraphStyle
from reportlab.platypus import Paragraph

# Cc: C0/C1 controls (ESC, NUL, CR …), DEL; Cs: lone surrogates, which no printer can encode.
_DROPPED = frozenset({"Cc", "Cs"})
# Bidi embedding, override and isolate marks: they could make a name or finding read backwards.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def plain(value: object) -> str:
    """``value`` as one line of printable text: control characters become spaces."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(" " if unicodedata.category(ch) in _DROPPED or ch in _BIDI_CONTROLS else ch for ch in text)


def paragraph(value: object, style: ParagraphStyle) -> Paragraph:
    """A Paragraph showing ``value`` literally: no markup, entity or control character survives."""
    return Paragraph(escape(plain(value)), style)
