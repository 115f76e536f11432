"""The one config file, edge.toml: loaded and validated once at start-up.

Each package declares its own section as a pydantic model with the default beside the
key; this module only assembles them and turns validation errors into one line per bad
key, so a field engineer sees ``[dicom] port: …`` instead of a traceback.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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

DEFAULT_CONFIG_NAME = "edge.toml"
CONFIG_ENV = "EDGE_CONFIG"


class ConfigError(Exception):
    """edge.toml is missing, unreadable or has a bad value; the message names the key."""


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


def _describe(error: dict[str, Any]) -> str:
    loc = [str(part) for part in error["loc"]]
    if len(loc) >= 2:
        where = f"[{loc[0]}] {'.'.join(loc[1:])}"
    elif loc:
        where = f"[{loc[0]}]" if error["type"] != "extra_forbidden" else loc[0]
    else:
        where = "(top level)"
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown key (misspelt? see the shipped edge.toml for the known keys)"
    elif "input" in error and not isinstance(error["input"], dict):
        message = f"{message} (got {error['input']!r})"
    return f"{where}: {message}"


def parse_config(data: dict[str, Any], base_dir: Path, source: str = DEFAULT_CONFIG_NAME) -> EdgeConfig:
    """Validate an already-parsed TOML mapping; raise ConfigError naming every bad key."""
    try:
        return EdgeConfig.model_validate({**data, "base_dir": base_dir})
    except ValidationError as exc:
        lines = [_describe(err) for err in exc.errors()]
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None


def resolve_config_path(path: str | os.PathLike[str] | None) -> Path:
    """--config wins, then $EDGE_CONFIG, then ./edge.toml."""
    if path:
        return Path(path)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else Path(DEFAULT_CONFIG_NAME)


def load_config(path: str | os.PathLike[str] | None = None) -> EdgeConfig:
    """Read and validate edge.toml; raise ConfigError with a one-line reason."""
    config_path = resolve_config_path(path)
    try:
        raw = config_path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{config_path}: config file not found (use --config or {CONFIG_ENV})") from None
    except OSError as exc:
        raise ConfigError(f"{config_path}: cannot read config file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{config_path}: not valid TOML: {exc}") from None
    if "base_dir" in data:
        raise ConfigError(f"{config_path}: base_dir: unknown key")
    return parse_config(data, config_path.resolve().parent, str(config_path))
