"""The whole edge.toml, assembled from every part's section (the roof may import them all)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge.config import (
    DEFAULT_CONFIG_NAME,
    config_error,
    read_config_file,
    resolve_config_path,
)
from edge.config.sections import (
    ConsoleSection,
    DicomSection,
    LoggingSection,
    NodeSection,
    StorageSection,
)
from edge.ops.config import OpsSection
from firmware_bridge.config import BridgeSection
from kiosk.config import KioskSection
from sync.config import CloudSection, ReportsSection, SyncSection


class EdgeConfig(BaseModel):
    """The whole node's configuration, one attribute per edge.toml section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    node: NodeSection = Field(default_factory=NodeSection)
    dicom: DicomSection = Field(default_factory=DicomSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    cloud: CloudSection = Field(default_factory=CloudSection)
    sync: SyncSection = Field(default_factory=SyncSection)
    reports: ReportsSection = Field(default_factory=ReportsSection)
    console: ConsoleSection = Field(default_factory=ConsoleSection)
    kiosk: KioskSection = Field(default_factory=KioskSection)
    bridge: BridgeSection = Field(default_factory=BridgeSection)
    ops: OpsSection = Field(default_factory=OpsSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)

    # Where the file was read from; relative paths in it are resolved against its folder.
    base_dir: Path = Field(default=Path("."), exclude=True)

    @property
    def data_dir(self) -> Path:
        """The data directory (spool, database) as an absolute path."""
        path = Path(self.storage.data_dir)
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    def path(self, value: str) -> Path | None:
        """A path key of this file, absolute ("" stays None)."""
        if not value:
            return None
        path = Path(value)
        return path if path.is_absolute() else (self.base_dir / path).resolve()


def parse_config(data: dict[str, Any], base_dir: Path, source: str = DEFAULT_CONFIG_NAME) -> EdgeConfig:
    """Validate an already-parsed TOML mapping; raise ConfigError naming every bad key."""
    try:
        return EdgeConfig.model_validate({**data, "base_dir": base_dir})
    except ValidationError as exc:
        raise config_error(exc, source) from None


def load_config(path: str | os.PathLike[str] | None = None) -> EdgeConfig:
    """Read and validate edge.toml; raise ConfigError with a one-line reason."""
    config_path = resolve_config_path(path)
    return parse_config(read_config_file(config_path), config_path.resolve().parent, str(config_path))
