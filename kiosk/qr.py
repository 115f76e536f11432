"""The cloud-film QR code (segno) as crisp vector squares on a reportlab page."""

from __future__ import annotations

import segno
from reportlab.lib.colors import black, white
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import Flowable


def make_qr(url: str) -> segno.QRCode:
    """Error correction M: survives a crease or smudge on thin kiosk paper."""
    return segno.make_qr(url, error="m", boost_error=False)


class QRFlowable(Flowable):
    """A QR code ``size`` points wide including its four-module quiet zone."""

    def __init__(self, url: str, size: float) -> None:
        super().__init__()
        self.qr = make_qr(url)
        self.size = size
        self.width = self.height = size

    def wrap(self, available_width: float, available_height: float) -> tuple[float, float]:
        return self.size, self.size

    def draw(self) -> None:
        draw_qr(self.canv, self.qr, 0, 0, self.size)


def draw_qr(c: Canvas, qr: segno.QRCode, x: float, y: float, size: float, border: int = 4) -> None:
    """Draw ``qr`` with its lower-left corner at (x, y)."""
    rows = list(qr.matrix)
    count = len(rows) + 2 * border
    module = size / count
    c.saveState()
    c.setFillColor(white)
    c.rect(x, y, size, size, stroke=0, fill=1)
    c.setFillColor(black)
    for r, row in enumerate(rows):
        top = y + size - (r + border + 1) * module
        run_start = None
        for col, dark in enumerate(list(row) + [0]):
            if dark and run_start is None:
                run_start = col
            elif not dark and run_start is not None:
                c.rect(x + (run_start + border) * module, top, (col - run_start) * module, module,
                       stroke=0, fill=1)
                run_start = None
    c.restoreState()
