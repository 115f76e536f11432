"""The [ops] section of edge.toml: heartbeat to central monitoring, textfile, zeroconf."""

from __future__ import annotations

import ipaddress
import re

from pydantic import Field, field_validator

from edge.config.sections import Section

_INTERFACE_NAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")


class OpsSection(Section):
    pushgateway_url: str = ""
    pushgateway_secrets_file: str = ""
    pushgateway_ca_bundle: str = ""
    push_interval_s: float = Field(default=60.0, ge=1.0, le=3600.0)
    push_timeout_s: float = Field(default=10.0, gt=0, le=300.0)
    textfile_dir: str = ""
    zeroconf: bool = True
    zeroconf_interfaces: list[str] = Field(default_factory=list)

    @field_validator("pushgateway_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https:// (or be \"\" for no heartbeat)")
        return value.rstrip("/")

    @field_validator("zeroconf_interfaces")
    @classmethod
    def _check_interfaces(cls, values: list[str]) -> list[str]:
        for value in values:
            try:
                ipaddress.ip_address(value)
            except ValueError:
                if not _INTERFACE_NAME.match(value):
                    raise ValueError(f"{value!r} is neither an IP address nor an interface name") from None
        return values
