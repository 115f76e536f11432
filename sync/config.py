"""sync's edge.toml sections: [cloud] (where and how to reach it), [sync] (the outbox
worker's pacing) and [reports] (pulling the reader's report back)."""

from __future__ import annotations

import datetime as dt
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from edge.config.sections import Section

_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


class CloudSection(Section):
    dicomweb_url: str = "http://127.0.0.1:8042/dicom-web"
    secrets_file: str = ""
    verify_tls: bool = True
    ca_bundle: str = ""
    client_cert: str = ""
    client_key: str = ""
    connect_timeout_s: float = Field(default=10.0, gt=0, le=300)
    read_timeout_s: float = Field(default=120.0, gt=0, le=3600)

    @field_validator("dicomweb_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _key_with_cert(self) -> CloudSection:
        if self.client_key and not self.client_cert:
            raise ValueError("client_key needs client_cert")
        return self


def parse_window(text: str) -> tuple[dt.time, dt.time]:
    """``"18:00-07:00"`` as (start, end); a window may run past midnight."""
    match = _WINDOW.match(text)
    if not match:
        raise ValueError(f"{text!r} is not HH:MM-HH:MM")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    return dt.time(h1, m1), dt.time(h2, m2)


class SyncSection(Section):
    enabled: bool = True
    concurrency: int = Field(default=2, ge=1, le=16)
    batch_max_bytes: int = Field(default=33554432, ge=1048576)
    batch_max_instances: int = Field(default=20, ge=1, le=500)
    bandwidth_bps: int = Field(default=0, ge=0)
    routine_windows: list[str] = Field(default_factory=list)
    compress: Literal["none", "jpeg-ls", "j2k"] = "jpeg-ls"
    retry_min_s: float = Field(default=2.0, gt=0, le=3600)
    retry_max_s: float = Field(default=300.0, gt=0, le=86400)
    poll_interval_s: float = Field(default=5.0, gt=0, le=3600)

    @field_validator("routine_windows")
    @classmethod
    def _check_windows(cls, values: list[str]) -> list[str]:
        for value in values:
            parse_window(value)
        return values

    @model_validator(mode="after")
    def _retry_order(self) -> SyncSection:
        if self.retry_max_s < self.retry_min_s:
            raise ValueError("retry_max_s must be at least retry_min_s")
        return self


class ReportsSection(Section):
    enabled: bool = True
    poll_interval_s: float = Field(default=15.0, ge=1, le=86400)
    lookback_days: int = Field(default=14, ge=1, le=365)
    min_backoff_s: float = Field(default=60.0, gt=0)
    max_backoff_s: float = Field(default=3600.0, gt=0)
    max_report_mb: int = Field(default=32, ge=1, le=1024)
    max_url_chars: int = Field(default=6000, ge=200, le=65536)
    query_timeout_s: float = Field(default=30.0, gt=0, le=3600)
