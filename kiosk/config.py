"""kiosk's edge.toml section: the patient kiosk, its printer and the cloud-film link."""

from __future__ import annotations

import ipaddress
import string
from typing import Literal

from pydantic import Field, field_validator, model_validator

from edge.config.patient_text import LANGUAGES, Language, PatientText
from edge.config.sections import Section

__all__ = ["LANGUAGES", "EXAMPLE_FILM_HOST", "KioskSection", "Language"]
_TEMPLATE_FIELDS = {"study_uid", "token"}
EXAMPLE_FILM_HOST = "film.example"  # the shipped placeholder: `edge doctor` warns until the cloud's own host is set


class KioskSection(Section):
    bind_address: str = "0.0.0.0"
    port: int = Field(default=8081, ge=1, le=65535)
    http_header_timeout_s: float = Field(default=10.0, gt=0, le=300)  # edge.http_server's limits
    http_keepalive_s: float = Field(default=15.0, gt=0, le=3600)
    http_max_connections: int = Field(default=64, ge=1, le=100_000)
    allowed_clients: list[str] = Field(default_factory=lambda: ["127.0.0.1", "::1"])
    languages: list[Language] = Field(default_factory=lambda: list(LANGUAGES))
    idle_timeout_s: float = Field(default=60.0, ge=5, le=3600)
    idle_warning_s: float = Field(default=15.0, ge=0, le=600)  # the "touch to stay" countdown before the reset
    pin_digits: int = Field(default=6, ge=4, le=8)
    ticket_valid_days: int = Field(default=90, ge=1, le=3650)
    max_pin_failures: int = Field(default=5, ge=1, le=100)
    lockout_minutes: float = Field(default=15.0, gt=0, le=10080)
    throttle_after_failures: int = Field(default=10, ge=1, le=1000)
    throttle_window_s: float = Field(default=600.0, gt=0, le=86400)
    throttle_max_delay_s: float = Field(default=60.0, gt=0, le=3600)
    throttle_node_failures: int = Field(default=30, ge=1, le=10000)
    print_limit: int = Field(default=2, ge=1, le=100)
    print_preliminary: bool = False  # sync.reports.current_report(..., print_preliminary=)
    report_estimate_hours: float = Field(default=24.0, gt=0, le=720)
    viewer_url_template: str = f"https://{EXAMPLE_FILM_HOST}/film/{{token}}"
    token_days: int = Field(default=30, ge=1, le=3650)
    token_key_file: str = ""
    printer: Literal["cups", "escpos"] = "cups"
    cups_server: str = ""
    cups_queue: str = Field(default="kiosk", pattern=r"^[A-Za-z0-9_.-]{1,127}$")
    escpos_device: str = "/dev/usb/lp0"
    printer_check_interval_s: float = Field(default=15.0, gt=0, le=3600)
    collect_at: PatientText = ""  # "" = the catalog's "the patient kiosk at reception" in the slip's language

    @field_validator("allowed_clients")
    @classmethod
    def _check_clients(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("list the kiosk screen's address, e.g. [\"127.0.0.1\", \"::1\"] for a screen on this box")
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network (e.g. \"192.168.1.20\")") from None
        return value

    @field_validator("viewer_url_template")
    @classmethod
    def _check_template(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        except ValueError as exc:
            raise ValueError(f"not a valid template: {exc}") from None
        if "token" not in names or not names <= _TEMPLATE_FIELDS:
            raise ValueError("must contain the placeholder {token} (and may contain {study_uid}), no others")
        return value

    @model_validator(mode="after")
    def _languages_present(self) -> KioskSection:
        if not self.languages:
            raise ValueError("languages: list at least one of en, zu, xh, af, st")
        if len(set(self.languages)) != len(self.languages):
            raise ValueError("languages: each language once")
        return self
