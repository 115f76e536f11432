"""The one config file, edge.toml: the primitives every part builds on.

Each part declares its own section as a pydantic model with the default beside the key
(``edge.config.sections`` holds the node's core ones: node, dicom, storage, console,
logging); the roof (``edge.node.config``) assembles them into one ``EdgeConfig``. What
lives here turns a file into a mapping and validation errors into one line per bad key, so
a field engineer sees ``[dicom] port: …`` instead of a traceback. It imports no part.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

DEFAULT_CONFIG_NAME = "edge.toml"
CONFIG_ENV = "EDGE_CONFIG"


class ConfigError(Exception):
    """edge.toml is missing, unreadable or has a bad value; the message names the key."""


def describe_error(error: Any) -> str:
    """One pydantic error as ``[section] key: reason``."""
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


def config_error(exc: ValidationError, source: str = DEFAULT_CONFIG_NAME) -> ConfigError:
    """Every bad key of one validation, on one line."""
    return ConfigError(f"{source}: " + "; ".join(describe_error(err) for err in exc.errors()))


def resolve_config_path(path: str | os.PathLike[str] | None) -> Path:
    """--config wins, then $EDGE_CONFIG, then ./edge.toml."""
    if path:
        return Path(path)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else Path(DEFAULT_CONFIG_NAME)


def read_config_file(config_path: Path) -> dict[str, Any]:
    """The TOML mapping of one config file; ConfigError with a one-line reason."""
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
    return data
