"""Fonts for printed pages: DejaVu Sans when installed (wide Latin coverage for names), else
reportlab's bundled Vera, so a page always renders."""

from __future__ import annotations

import functools
from pathlib import Path

from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont

_CANDIDATES = (
    ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"),
)


@functools.cache
def page_fonts() -> tuple[str, str]:
    """(regular, bold) font names registered with reportlab."""
    for regular, bold in _CANDIDATES:
        if Path(regular).exists() and Path(bold).exists():
            pdfmetrics.registerFont(TTFont("Kiosk", regular))
            pdfmetrics.registerFont(TTFont("Kiosk-Bold", bold))
            return "Kiosk", "Kiosk-Bold"
    # reportlab ships Vera on its own font search path
    pdfmetrics.registerFont(TTFont("Kiosk", "Vera.ttf"))
    pdfmetrics.registerFont(TTFont("Kiosk-Bold", "VeraBd.ttf"))
    return "Kiosk", "Kiosk-Bold"
