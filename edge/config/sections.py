"""The core's edge.toml sections: [node], [dicom], [storage], [console], [logging]."""

from __future__ import annotations

import re
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edge.config.patient_text import PatientText, english

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash


def check_ae_title(value: str) -> str:
    """AE titles are 1–16 printable characters, no backslash, not all spaces."""
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError("an AE title is 1 to 16 printable characters, without backslash")
    return value.strip()


class Section(BaseModel):
    """Every section rejects unknown keys, so a typo stops start-up instead of passing."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSection(Section):
    id: str = Field(default="clinic-0001", pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    name: str = Field(default="Example Clinic", min_length=1, max_length=64)
    phone: str = Field(default="", max_length=32)  # printed on the report page for the patient's questions
    timezone: str = "Africa/Johannesburg"  # the clinic's: every time a page shows is in it (IANA name)

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not a time zone name such as \"Africa/Johannesburg\"") from None
        return value


class DicomSection(Section):
    ae_title: str = "EDGE"
    bind_address: str = "0.0.0.0"
    port: int = Field(default=11112, ge=1, le=65535)
    allowed_calling_aets: list[str] = Field(default_factory=list)
    require_called_aet: bool = True
    max_pdu_bytes: int = Field(default=262144, ge=0, le=16777216)
    max_associations: int = Field(default=8, ge=1, le=64)
    # A peer that is not a configured modality holds at most this many per address (edge.dicom.slots).
    max_associations_per_host: int = Field(default=2, ge=1, le=64)
    network_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    # The clinic's DR, for `edge doctor` (C-ECHO); "" host = not configured.
    modality_ae: str = "DR"
    modality_host: str = ""
    modality_port: int = Field(default=104, ge=1, le=65535)
    # More of the clinic's modalities (a second DR, a CR reader), as "AE@host".
    other_modalities: list[str] = Field(default_factory=list)
    # The worklist answers steps from today - days_back to today + days_ahead, never more.
    worklist_days_back: int = Field(default=0, ge=0, le=7)
    worklist_days_ahead: int = Field(default=0, ge=0, le=7)

    _check_ae = field_validator("ae_title", "modality_ae")(check_ae_title)

    @field_validator("other_modalities")
    @classmethod
    def _check_modalities(cls, values: list[str]) -> list[str]:
        checked = []
        for value in values:
            ae, sep, host = value.partition("@")
            if not sep or not host.strip():
                raise ValueError(f"{value!r}: write each modality as \"AE@host\", e.g. \"CR1@192.168.1.21\"")
            checked.append(f"{check_ae_title(ae)}@{host.strip()}")
        return checked

    @field_validator("allowed_calling_aets")
    @classmethod
    def _check_calling(cls, values: list[str]) -> list[str]:
        return [check_ae_title(v) for v in values]

    @field_validator("max_pdu_bytes")
    @classmethod
    def _check_pdu(cls, value: int) -> int:
        if value and value < 4096:
            raise ValueError("use 0 (unlimited) or at least 4096 bytes")
        return value


class StorageSection(Section):
    data_dir: str = Field(default="var", min_length=1)
    min_free_mb: int = Field(default=500, ge=0)
    retention_days: int = Field(default=30, ge=0, le=3650)
    high_water_free_mb: int = Field(default=2000, ge=0)
    # What decoding one received instance may cost (edge.store.walk): C-STORE over it is 0xA700, a kept one is quarantined.
    max_instance_mb: int = Field(default=512, ge=16, le=4096)
    max_deflate_ratio: float = Field(default=50.0, ge=2, le=10000)
    max_elements: int = Field(default=200_000, ge=1000, le=50_000_000)


class ConsoleSection(Section):
    bind_address: str = "0.0.0.0"
    port: int = Field(default=8080, ge=1, le=65535)
    # Connection limits of the console's HTTP server (edge.http_server).
    http_header_timeout_s: float = Field(default=10.0, gt=0, le=300)
    http_keepalive_s: float = Field(default=15.0, gt=0, le=3600)
    http_max_connections: int = Field(default=128, ge=1, le=100_000)
    # The technician console (edge.console, edge.orders).
    exams: list[PatientText] = Field(default_factory=list)  # a name, or one per language (edge.config.patient_text)
    xray_modality: str = Field(default="DX", pattern=r"^[A-Z]{2,8}$")
    secure_cookies: bool = False
    # HTTPS for the console (edge.console.tls): PEM certificate and key; both "" = plain http.
    tls_cert: str = ""
    tls_key: str = ""
    session_idle_minutes: float = Field(default=120.0, gt=0, le=24 * 60)
    max_login_failures: int = Field(default=5, ge=1, le=100)
    login_lockout_minutes: float = Field(default=15.0, gt=0, le=24 * 60)
    login_address_failures: int = Field(default=20, ge=1, le=1000)
    login_address_window_minutes: float = Field(default=15.0, gt=0, le=24 * 60)
    refresh_s: float = Field(default=3.0, ge=1.0, le=60.0)

    @field_validator("exams")
    @classmethod
    def _check_exams(cls, values: list[str | dict[str, str]]) -> list[str | dict[str, str]]:
        for value in values:
            name = english(value)
            if not name or len(name) > 64 or "\\" in name:
                raise ValueError("each exam is 1 to 64 characters, without backslash")
        return values

    def exam_names(self) -> list[str]:
        """The exams' English names: what the technician picks and the worklist carries."""
        return [english(value) for value in self.exams]


class LoggingSection(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
