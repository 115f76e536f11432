"""What the kiosk's screens share and say, apart from their markup (``templates/``, autoescaped).

Every word a patient reads comes from the catalog (``t``); the templates escape it and
every value from a DICOM header or the cloud's report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kiosk.const import NotReady
from kiosk.i18n import Catalog, load_catalog
from kiosk.icons import ICON_PATHS


@dataclass(frozen=True)
class Frame:
    """What every page shares."""

    t: Catalog
    clinic_name: str
    idle_s: float
    warning_s: float = 0.0  # the "touch to stay" countdown's length ([kiosk] idle_warning_s)

    def context(self, page: str, title: str, home: bool = True) -> dict[str, Any]:
        """The layout's values for one screen."""
        before, after = countdown_words(self.t)
        return {"t": self.t, "clinic": self.clinic_name, "idle": int(self.idle_s), "page": page, "title": title,
                "home": home, "warning": int(self.warning_s), "countdown_before": before, "countdown_after": after}


_MARK = "\x00"


def countdown_words(t: Catalog) -> tuple[str, str]:
    """The countdown sentence around its number, which kiosk.js counts down in between."""
    before, _, after = t("idle_countdown", seconds=_MARK).partition(_MARK)
    return before, after


def language_choices(languages: Sequence[str]) -> list[tuple[str, Catalog]]:
    """Each language's button reads in its own language."""
    return [(lang, load_catalog(lang)) for lang in languages]


def not_ready_text(t: Catalog, estimate_hours: float, wait: NotReady = "uploading") -> str:
    """When the report should be ready, as the patient reads it: never "tomorrow" once the
    images are with the doctor (remote reads come within hours), "ask at reception" once
    that is longer than usual."""
    if wait == "writing":
        return t("not_ready_writing")
    if wait == "with_doctor":
        return t("not_ready_hour") if estimate_hours <= 1.5 else t("not_ready_with_doctor")
    if wait == "overdue":
        return t("not_ready_overdue")
    if estimate_hours <= 1.5:
        return t("not_ready_hour")
    if estimate_hours <= 12:
        return t("not_ready_hours", hours=round(estimate_hours))
    return t("not_ready_tomorrow")


TEMPLATE_GLOBALS: dict[str, Any] = {"ICON_PATHS": ICON_PATHS}
