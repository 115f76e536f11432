"""kiosk's edge.toml section."""

from __future__ import annotations

from pydantic import Field

from edge.config.sections import Section


class KioskSection(Section):
    port: int = Field(default=8081, ge=1, le=65535)
