"""sync's edge.toml sections: [cloud] (where to send)."""

from __future__ import annotations

from pydantic import field_validator

from edge.config.sections import Section


class CloudSection(Section):
    dicomweb_url: str = "http://127.0.0.1:8042/dicom-web"

    @field_validator("dicomweb_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")
